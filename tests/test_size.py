"""size_report against bit counts worked out by hand from the layer shapes."""
from __future__ import annotations

import pytest

from conftest import needs_shared, tiny_model, unique_params
from lowbit.config import QuantConfig, parse_spec
from lowbit.quantize import quantize_model
from lowbit.size import PARTS, format_size_report, size_report

# tiny Llama (conftest): hidden 64, 4 heads (head dim 16), 2 KV heads, FFN 72, 2 layers, vocab 128, untied
ATTN_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64)]  # q, k, v, o as (out, in)
FFN_SHAPES = [(72, 64), (72, 64), (64, 72)]  # gate, up, down
LAYERS, HIDDEN, VOCAB = 2, 64, 128


def _int_group_bits(shape, bits: int, g: int, sym: bool, scale_bits: int = 16) -> int:
    """codes + one fp16 scale (+ one ``bits``-bit zero-point when asymmetric) per started group of a row."""
    rows, n = shape
    groups = rows * -(-n // g)
    return rows * n * bits + groups * (scale_bits + (0 if sym else bits))


def test_float_model_is_16_bits_everywhere():
    model = tiny_model("LlamaForCausalLM")
    rep = size_report(model)
    assert set(rep["parts"]) == set(PARTS)
    attn = LAYERS * sum(o * i for o, i in ATTN_SHAPES)
    ffn = LAYERS * sum(o * i for o, i in FFN_SHAPES)
    expect_params = {"embeddings": VOCAB * HIDDEN, "attention": attn, "ffn": ffn,
                     "norms": LAYERS * 2 * HIDDEN, "head": VOCAB * HIDDEN, "other": HIDDEN}
    for part, n in expect_params.items():
        v = rep["parts"][part]
        assert v["params"] == n, part
        assert v["quantized_params"] == 0
        assert v["bits"] == 16 * n and v["bits_per_param"] == 16.0, part
    assert rep["model_params"] == sum(p.numel() for p in model.parameters()) == sum(expect_params.values())
    assert rep["blocks_params"] == attn + ffn + LAYERS * 2 * HIDDEN
    assert rep["model_bits_per_param"] == 16.0 and rep["blocks_bits_per_param"] == 16.0
    assert rep["model_megabytes"] == pytest.approx(rep["model_params"] * 2 / 2**20)
    rep32 = size_report(model, float_bits=32)
    assert rep32["model_bits_per_param"] == 32.0 and rep32["model_bits"] == 2 * rep["model_bits"]


def test_int4_g32_asym_bits_per_param_by_hand():
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32")), progress=False)
    rep = size_report(model)
    parts = rep["parts"]

    # every attention row has 64 inputs = two full groups: 4 bits + (16-bit scale + 4-bit zero) / 32
    assert parts["attention"]["bits_per_param"] == pytest.approx(4 + (16 + 4) / 32, rel=1e-12)
    assert parts["attention"]["quantized_params"] == parts["attention"]["params"]
    attn_bits = LAYERS * sum(_int_group_bits(s, 4, 32, sym=False) for s in ATTN_SHAPES)
    assert parts["attention"]["bits"] == attn_bits

    # down_proj rows have 72 inputs: groups of 32, 32 and a short one of 8 (still one scale + zero)
    down = 64 * 72 * 4 + 64 * 3 * (16 + 4)
    gate_up = 2 * (72 * 64 * 4 + 72 * 2 * (16 + 4))
    ffn_params = LAYERS * (3 * 72 * 64)
    assert parts["ffn"]["bits"] == LAYERS * (gate_up + down)
    assert parts["ffn"]["bits_per_param"] == pytest.approx(LAYERS * (gate_up + down) / ffn_params, rel=1e-12)
    assert parts["ffn"]["bits_per_param"] > 4 + 20 / 32  # the ragged group costs a little more

    for p in ("embeddings", "head", "norms", "other"):
        assert parts[p]["bits_per_param"] == 16.0 and parts[p]["quantized_params"] == 0
    blocks_bits = attn_bits + LAYERS * (gate_up + down) + 16 * LAYERS * 2 * HIDDEN
    assert rep["blocks_bits"] == blocks_bits
    assert rep["blocks_bits_per_param"] == pytest.approx(blocks_bits / rep["blocks_params"], rel=1e-12)
    assert rep["model_bits"] == blocks_bits + 16 * (2 * VOCAB * HIDDEN + HIDDEN)
    table = format_size_report(rep)
    assert "attention" in table and "4.625" in table


def test_int3_sym_and_mxfp4_by_hand():
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec("int3", "g32", symmetric=True)), progress=False)
    assert size_report(model)["parts"]["attention"]["bits_per_param"] == pytest.approx(3 + 16 / 32, rel=1e-12)
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec("mxfp4")), progress=False)  # 8-bit e8m0 per 32 values
    assert size_report(model)["parts"]["attention"]["bits_per_param"] == pytest.approx(4 + 8 / 32, rel=1e-12)


def test_opt_biases_and_position_embeddings():
    model = tiny_model("OPTForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec("int8", "channel")), progress=False)
    parts = size_report(model)["parts"]
    # q, k, v, out: 64x64 weights at 8 bits + 64 (scale 16 + zero 8) per row, plus 64 fp16 biases each
    attn_bits = LAYERS * 4 * (64 * 64 * 8 + 64 * 24 + 64 * 16)
    assert parts["attention"]["bits"] == attn_bits
    assert parts["attention"]["quantized_params"] == LAYERS * 4 * 64 * 64
    ffn_bits = LAYERS * ((72 * 64 * 8 + 72 * 24 + 72 * 16) + (64 * 72 * 8 + 64 * 24 + 64 * 16))
    assert parts["ffn"]["bits"] == ffn_bits
    pos = model.model.decoder.embed_positions.weight.numel()
    assert parts["embeddings"]["params"] == VOCAB * HIDDEN + pos  # learned positions count as embeddings
    assert parts["head"]["params"] == 0  # OPT ties its head


def test_tied_embeddings_counted_once():
    model = tiny_model("Gemma2ForCausalLM")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rep = size_report(model)
    assert rep["model_params"] == unique_params(model) == sum(p.numel() for p in model.parameters())
    assert rep["parts"]["embeddings"]["params"] == VOCAB * HIDDEN and rep["parts"]["head"]["params"] == 0

    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32"), embed=parse_spec("int8", "channel")),
                   progress=False)
    rep = size_report(model)
    assert rep["model_params"] == unique_params(model)
    emb = rep["parts"]["embeddings"]
    assert emb["params"] == emb["quantized_params"] == VOCAB * HIDDEN
    assert emb["bits"] == VOCAB * HIDDEN * 8 + VOCAB * (16 + 8)  # per-row scale and 8-bit zero, once
    assert rep["parts"]["head"]["params"] == 0 and rep["parts"]["head"]["bits"] == 0


@needs_shared
def test_stories260k_params():
    from lowbit.models import load_model

    model, _ = load_model("stories260k")
    rep = size_report(model)
    assert rep["model_params"] == 260_032 == unique_params(model)
    assert rep["parts"]["embeddings"]["params"] == 512 * 64 and rep["parts"]["head"]["params"] == 0
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32")), progress=False)
    ffn = size_report(model)["parts"]["ffn"]
    # FFN width 172 -> ceil(172/32) = 6 groups per down_proj row; gate/up rows have 64 inputs
    per_layer = 2 * (172 * 64 * 4 + 172 * 2 * 20) + (64 * 172 * 4 + 64 * 6 * 20)
    assert ffn["bits"] == 5 * per_layer
