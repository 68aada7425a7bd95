"""GPTQ oracles: never worse than RTN on its own objective, equal to the naive column loop, robust Hessians."""
from __future__ import annotations

import pytest
import torch

from conftest import SHARED, needs_shared
from lowbit.config import parse_spec
from lowbit.gptq import accumulate_hessian, gptq
from lowbit.quantizer import quantize, quantize_weight


def _layer(seed=0, out=48, inp=96, tokens=512):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    # correlated inputs with a few large channels, like LLM activations
    X = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    X[:, :4] *= 8
    return W, X


def _objective(W, Q, H):
    D = (W - Q).double()
    return torch.trace(D @ H @ D.T).item()


def _hessian(X, chunks=4):
    H, n = None, 0
    for x in X.chunk(chunks):
        H, n = accumulate_hessian(H, n, x)
    return H


def test_hessian_matches_closed_form():
    _, X = _layer()
    H = _hessian(X, chunks=4)
    # 4 chunks of 128 tokens, each counted as one sample: H = 2/4 * sum_b X_b^T X_b
    torch.testing.assert_close(H, 2 / 4 * (X.double().T @ X.double()), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("fmt, gran, sym", [("int4", "channel", False), ("int3", "channel", False),
                                             ("int3", "g32", False), ("int4", "g32", True), ("int2", "g64", False),
                                             ("nf4", "g32", False), ("int3", "g40", False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_never_worse_than_rtn(fmt, gran, sym, act_order):
    W, X = _layer()
    H = _hessian(X)
    spec = parse_spec(fmt, gran, symmetric=sym)
    q = gptq(W, H, spec, act_order=act_order)
    rtn = quantize_weight(W, spec)
    assert _objective(W, q.dequantize(), H) < _objective(W, rtn.dequantize(), H)
    # the result lies on its own grid in the plain layout: re-quantizing with its qparams gives its codes
    assert torch.equal(quantize(q.dequantize(), q.qparams, spec), q.codes)


def test_blocked_equals_column_by_column():
    """Lazy block updates are an exact reorganisation of the one-column-at-a-time algorithm."""
    W, X = _layer(seed=1)
    H = _hessian(X)
    spec = parse_spec("int3", "g32")
    fast = gptq(W, H, spec, block_size=32).dequantize()
    naive = gptq(W, H, spec, block_size=1).dequantize()
    assert (fast != naive).float().mean() < 0.01  # float reassociation can flip a rare tie
    assert abs(_objective(W, fast, H) - _objective(W, naive, H)) / _objective(W, naive, H) < 1e-3


def test_dead_inputs_and_too_few_samples_are_damped():
    W, X = _layer(seed=2)
    X[:, 10:20] = 0  # dead input channels
    H = _hessian(X[:8], chunks=2)  # 8 tokens for 96 inputs: rank-deficient
    q = gptq(W, H, parse_spec("int4", "g32"))
    Q = q.dequantize()
    assert torch.isfinite(Q).all()
    assert (Q[:, 10:20] == 0).all()  # dead columns are zeroed, as in the reference code


def test_act_order_without_static_groups_is_refused():
    W, X = _layer()
    with pytest.raises(ValueError, match="static_groups"):
        gptq(W, _hessian(X), parse_spec("int4", "g32"), act_order=True, static_groups=False)


@needs_shared
def test_gptq_method_beats_rtn_on_stories260k(tmp_path, capsys):
    """Model-level GPTQ (calibrated on training stories) beats RTN on the held-out stories at int3."""
    import json

    from lowbit.cli import main

    text = (SHARED / "data" / "tinystories" / "tinystories_train_head_2MiB.txt").read_text()
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:200_000])  # the start of the sample: training stories, not the held-out 10%
    ppl = {}
    for method in ("rtn", "gptq"):
        js = tmp_path / f"{method}.json"
        code = main(["-q", "quantize", "stories260k", "--method", method, "--w-format", "int3", "--eval",
                     "tinystories", "--max-windows", "40", "--calib", str(calib), "--nsamples", "32", "--json", str(js)])
        assert code == 0, capsys.readouterr().err
        ppl[method] = json.loads(js.read_text())["metrics"]["tinystories"]["ppl"]
    rec = json.loads((tmp_path / "gptq.json").read_text())
    assert rec["calibration"]["source"] == str(calib) and rec["calibration"]["nsamples"] == 32
    assert ppl["gptq"] < ppl["rtn"], ppl


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_rows_equal_separate_solves(act_order):
    """q/k/v share a Hessian: solving their stacked rows at once equals solving each (rows never interact)."""
    from lowbit.gptq import _split_rows

    torch.manual_seed(3)
    X = torch.randn(256, 40)
    H, _ = accumulate_hessian(None, 0, X)
    Ws = [torch.randn(r, 40) for r in (8, 4, 4)]
    spec = parse_spec("int3", "g16")
    joint = _split_rows(gptq(torch.cat(Ws), H, spec, act_order=act_order), [8, 4, 4])
    for W, qj in zip(Ws, joint):
        qs = gptq(W, H, spec, act_order=act_order)
        assert torch.equal(qj.codes, qs.codes)
        assert torch.allclose(qj.dequantize(), qs.dequantize(), atol=1e-5)


@pytest.mark.parametrize("fmt, gran", [("int4", "g32"), ("int3", "g32"), ("int2", "g64"), ("int3", "g40"),
                                       ("nf4", "g32")])
def test_static_groups_without_act_order(fmt, gran):
    """llm-compressor's choice: every group's qparams from the original W (RTN's grid), in natural order."""
    from lowbit.quantizer import compute_qparams

    W, X = _layer(seed=4)
    H = _hessian(X)
    spec = parse_spec(fmt, gran)
    q = gptq(W, H, spec, static_groups=True)
    rtn = quantize_weight(W, spec)
    assert _objective(W, q.dequantize(), H) < _objective(W, rtn.dequantize(), H)
    qp = compute_qparams(W, spec)
    assert torch.equal(q.qparams.scale, qp.scale)
    assert (q.qparams.zero is None) == (qp.zero is None)
    if qp.zero is not None:
        assert torch.equal(q.qparams.zero, qp.zero)
    assert torch.equal(quantize(q.dequantize(), q.qparams, spec), q.codes)
    # the default without act-order fits each group on the updated weights: other qparams
    lazy = gptq(W, H, spec)
    assert not torch.equal(lazy.qparams.scale, qp.scale)


def test_static_groups_option_of_the_method():
    from lowbit.config import QuantConfig
    from lowbit.gptq import options

    spec = parse_spec("int4", "g32")
    opts = options(QuantConfig(weight=spec, method="gptq", extra={"act_order": False, "gptq_static_groups": True}))
    assert opts == {"act_order": False, "static_groups": True}
    assert "static_groups" not in options(QuantConfig(weight=spec, method="gptq"))
    for extra in ({"gptq_static_groups": "yes"}, {"gptq_static_groups": 1},
                  {"act_order": True, "gptq_static_groups": False}):
        with pytest.raises(ValueError) as e:
            options(QuantConfig(weight=spec, method="gptq", extra=extra))
        assert "\n" not in str(e.value) and "gptq_static_groups" in str(e.value)


def test_static_groups_method_on_a_tiny_model():
    """The model-level method passes the option through: every Linear ends on RTN's min-max grid."""
    import copy

    from conftest import tiny_model

    from lowbit.config import QuantConfig
    from lowbit.qmodules import QuantLinear
    from lowbit.quantize import quantize_model
    from lowbit.quantizer import compute_qparams

    base = tiny_model()
    W0 = {n: m.weight.detach().clone() for n, m in base.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = parse_spec("int3", "g16")
    for static in (True, False):
        m = quantize_model(copy.deepcopy(base), QuantConfig(weight=spec, method="gptq",
                                                            extra={"act_order": False, "gptq_static_groups": static}),
                           calib=calib, progress=False)
        same = [torch.equal(mod.w_scale, compute_qparams(W0[n], spec).scale)
                for n, mod in m.model.layers.named_modules() if isinstance(mod, QuantLinear)]
        assert len(same) == len(W0)
        assert all(same) if static else not all(same)


def test_attn_cache_option_is_checked():
    from lowbit.config import QuantConfig
    from lowbit.gptq import attn_cache_option

    spec = parse_spec("int4", "g32")
    assert attn_cache_option(QuantConfig(weight=spec, method="gptq")) is True
    assert attn_cache_option(QuantConfig(weight=spec, method="gptq", extra={"attn_cache": False})) is False
    with pytest.raises(ValueError, match="attn_cache must be true or false"):
        attn_cache_option(QuantConfig(weight=spec, method="spqr", extra={"attn_cache": "no"}))
