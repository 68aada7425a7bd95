"""AWQ oracles: the search never loses to no scaling / no clipping on its own objective, folding keeps the
float model, and on stories260K at int3 it beats RTN on held-out text."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHARED, needs_shared
from lowbit.awq import awq_scale, clip_weight, search_clip, search_scale
from lowbit.config import QuantConfig, parse_spec
from lowbit.qmodules import QuantLinear, replace_modules
from lowbit.quantize import block_linear_filter, get_algorithm, quantize_model
from lowbit.quantizer import fake_quantize, quantize_weight
from lowbit.smooth import float_mode
from test_smoothquant import IDS, model_for


def _layer(seed=0, out=48, inp=96, tokens=256):
    """A weight and inputs with a few salient (large) input channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g)
    X[:, :6] *= 20
    return W, X


def test_awq_scale_is_normalised_and_ratio_zero_is_identity():
    x = torch.tensor([0.01, 1.0, 4.0, 0.0])
    torch.testing.assert_close(awq_scale(x, 0.0), torch.ones(4))
    s = awq_scale(x, 0.5)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    assert s[2] > s[1] > s[0] > 0 and s[3] > 0  # monotone in s_x, dead channels clamped away from 0


@pytest.mark.parametrize("fmt, gran, sym", [("int3", "g32", False), ("int4", "channel", True), ("int3", "g40", False),
                                             ("nf4", "g32", False)])
def test_search_scale_oracle(fmt, gran, sym):
    """Layer level: ratio 0 is exactly RTN, the pick is the grid's minimum, and salient inputs make it win."""
    W, X = _layer()
    spec = parse_spec(fmt, gran, symmetric=sym)
    ref = X @ W.T
    mse = lambda wq: float((X @ wq[0].T - ref).pow(2).mean())  # noqa: E731
    s, losses = search_scale(X.abs().mean(0), [W], [spec], mse, grid=20)
    assert len(losses) == 20
    assert losses[0] == pytest.approx(mse([quantize_weight(W, spec).dequantize()]), rel=1e-6)
    best = min(range(20), key=losses.__getitem__)
    torch.testing.assert_close(s, awq_scale(X.abs().mean(0), best / 20))
    w_awq = fake_quantize(W * s, spec) / s
    assert mse([w_awq]) == pytest.approx(losses[best], rel=1e-6)
    assert losses[best] < 0.9 * losses[0], losses


@pytest.mark.parametrize("fmt, gran, sym", [("int3", "g32", False), ("int3", "g40", False), ("int4", "channel", True),
                                             ("int4", "tensor", True), ("nf4", "g32", False)])
def test_search_clip_never_worse_per_group(fmt, gran, sym):
    """Each (row, group) keeps the clip with the least output error of its own columns; no clip is a candidate."""
    W, X = _layer(seed=1)
    W[:, 3] *= 6  # a few large weights, so shrinking the range pays off somewhere
    spec = parse_spec(fmt, gran, symmetric=sym)
    bound = search_clip(W, X, spec, grid=20, max_shrink=0.5, n_tokens=128)
    Wc = clip_weight(W, bound, spec)
    assert (Wc.abs() <= W.abs() + 1e-7).all() and (Wc != W).any()
    x = X[:: X.shape[0] // 128][:128]
    size = {"g32": 32, "g40": 40}.get(gran, W.shape[1])  # g40 on 96 columns: a ragged last group of 16

    def err(wq):  # (rows, groups): mean over tokens of each group's partial output error squared
        d = wq - W
        return torch.stack([(x[:, c:c + size] @ d[:, c:c + size].T).pow(2).mean(0)
                            for c in range(0, W.shape[1], size)], 1)

    clipped, plain = err(fake_quantize(Wc, spec)), err(fake_quantize(W, spec))
    assert clipped.sum() < plain.sum()
    if gran != "tensor":  # one bound per (row, group): none gets worse
        assert (clipped <= plain * (1 + 1e-4) + 1e-6).all()


def _wrapped(arch, spec):
    model = model_for(arch)
    q = copy.deepcopy(model)
    replace_modules(q, lambda m, n: QuantLinear.from_linear(m, spec), block_linear_filter(q))
    return model, q


@pytest.mark.parametrize("arch", ["Llama-MHA", "Gemma2ForCausalLM", "OPTForCausalLM"])
def test_awq_scaling_alone_keeps_float_logits(arch):
    model, q = _wrapped(arch, parse_spec("int3", "g32"))
    before = [m.weight.clone() for m in q.modules() if isinstance(m, QuantLinear)]
    get_algorithm("awq")(q, QuantConfig(weight=parse_spec("int3", "g32"), method="awq",
                                        extra={"awq_clip": False, "awq_grid": 10}), calib=IDS, progress=False)
    after = [m.weight for m in q.modules() if isinstance(m, QuantLinear)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # some scale was chosen
    assert not any(m.frozen for m in q.modules() if isinstance(m, QuantLinear))  # a transform: nothing rounded
    with float_mode(q), torch.no_grad():
        torch.testing.assert_close(q(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_awq_alone_is_followed_by_rtn_and_awq_gptq_recipe_runs():
    spec = parse_spec("int3", "g32")
    for method in ("awq", "awq,gptq"):
        q = model_for("LlamaForCausalLM")
        quantize_model(q, QuantConfig(weight=spec, method=method, extra={"awq_grid": 5}), calib=IDS, progress=False)
        lins = [m for m in q.modules() if isinstance(m, QuantLinear)]
        assert len(lins) == 14 and all(m.frozen for m in lins)
        assert torch.isfinite(q(IDS).logits).all()


@needs_shared
def test_awq_beats_rtn_on_stories260k(tmp_path):
    """int3 g32 weight-only, calibrated on training stories, evaluated on the held-out ones."""
    import lowbit
    from lowbit.calib import calibration_batches
    from lowbit.data import eval_ids
    from lowbit.eval import perplexity

    base, tok = lowbit.load_model("stories260k")
    text = (SHARED / "data" / "tinystories" / "tinystories_train_head_2MiB.txt").read_text()
    (tmp_path / "calib.txt").write_text(text[:200_000])  # the head of the file: training stories only
    calib = calibration_batches(tok, str(tmp_path / "calib.txt"), n=16, seqlen=256)
    ev = eval_ids("tinystories", tok, 512)
    ppl = {}
    for method, extra in (("rtn", {}), ("awq", {"awq_grid": 10, "awq_tokens": 1024})):
        m = copy.deepcopy(base)
        quantize_model(m, QuantConfig(weight=parse_spec("int3", "g32"), method=method, extra=extra), calib=calib,
                       progress=False)
        ppl[method] = perplexity(m, ev, 512, max_windows=8, progress=False)["ppl"]
    # measured: float 5.30, rtn 9.43, awq 7.92 (8.72 without clipping; 7.79 with the default grid and tokens)
    assert ppl["awq"] < 0.93 * ppl["rtn"], ppl
