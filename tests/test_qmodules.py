"""QuantLinear / QuantEmbedding: live vs frozen, idempotent freezing, activations, surgery, tied weights.

Oracles are written by hand from the documented grids (min-max asymmetric integers, NF4 / FP4
tables with absmax or power-of-two scales, GGUF two-level blocks), not taken from the library.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import STORIES, needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.formats import NF4_LEVELS
from lowbit.models import arch_of, load_model, tied_embeddings
from lowbit.qmodules import QuantEmbedding, QuantLinear, quant_modules, replace_modules
from lowbit.quantize import block_linear_filter, quantize_model
from lowbit.quantizer import fake_quantize, quantize, quantize_weight

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ----------------------------------------------------------------------------------- hand oracles
def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s.clamp(2.0**-24, 65504.0).half().float()


def int_asym_oracle(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Min-max asymmetric RTN over runs of ``g`` columns (short last run allowed)."""
    qmax = 2**bits - 1
    out = torch.empty_like(w)
    for j in range(0, w.shape[-1], g):
        blk = w[..., j:j + g]
        lo = blk.amin(-1, keepdim=True).clamp(max=0)
        hi = blk.amax(-1, keepdim=True).clamp(min=0)
        s = _fp16_scale((hi - lo) / qmax)
        z = torch.round(-lo / s).clamp(0, qmax)
        out[..., j:j + g] = s * (torch.clamp(torch.round(blk / s + z), 0, qmax) - z)
    return out


def table_oracle(w: torch.Tensor, table: torch.Tensor, g: int, pow2: bool) -> torch.Tensor:
    """Nearest value of ``table`` after scaling each group's absmax onto max(table)."""
    out = torch.empty_like(w)
    top = table.max().item()
    for j in range(0, w.shape[-1], g):
        blk = w[..., j:j + g]
        amax = blk.abs().amax(-1, keepdim=True)
        if pow2:  # OCP MX: 2^(floor(log2 amax) - emax_elem)
            s = torch.exp2(torch.floor(torch.log2(amax)) - math.floor(math.log2(top)))
        else:
            s = _fp16_scale(amax / top)
        v = blk / s
        idx = (v.unsqueeze(-1) - table).abs().argmin(-1)
        out[..., j:j + g] = s * table[idx]
    return out


def gguf_asym_oracle(w: torch.Tensor, bits: int = 4, sub: int = 32, per_super: int = 8, sbits: int = 6):
    """llama.cpp k-quant style: x_hat = d*sc*q - dmin*m with 6-bit sc, m against fp16 d, dmin."""
    R, n = w.shape
    qmax, smax = 2**bits - 1, 2**sbits - 1
    G = -(-n // sub)
    lo = torch.stack([w[:, j * sub:(j + 1) * sub].amin(1).clamp(max=0) for j in range(G)], 1)
    hi = torch.stack([w[:, j * sub:(j + 1) * sub].amax(1).clamp(min=0) for j in range(G)], 1)
    s_raw, m_raw = (hi - lo) / qmax, -lo
    out = torch.empty_like(w)
    for k in range(0, G, per_super):
        sl = slice(k, min(k + per_super, G))
        d = (s_raw[:, sl].amax(1, keepdim=True) / smax).clamp(2.0**-24, 65504).half().float()
        dmin = (m_raw[:, sl].amax(1, keepdim=True) / smax).clamp(2.0**-24, 65504).half().float()
        sc = torch.round(s_raw[:, sl] / d).clamp(0, smax).clamp_min(1)
        mc = torch.round(m_raw[:, sl] / dmin).clamp(0, smax)
        for jj, j in enumerate(range(sl.start, sl.stop)):
            blk = w[:, j * sub:(j + 1) * sub]
            scale, mn = d[:, 0] * sc[:, jj], dmin[:, 0] * mc[:, jj]
            q = torch.clamp(torch.round((blk + mn[:, None]) / scale[:, None]), 0, qmax)
            out[:, j * sub:(j + 1) * sub] = scale[:, None] * q - mn[:, None]
    return out


def _linear(in_f: int, out_f: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[0, 3] = 0.4  # an outlier
    return lin


# -------------------------------------------------------------------------------------- QuantLinear
def test_from_linear_shares_parameters():
    lin = _linear(64, 16)
    spec = parse_spec("int4", "g32")
    q = QuantLinear.from_linear(lin, spec)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert (q.in_features, q.out_features) == (64, 16)
    assert q.w_spec == spec and q.a_spec is None and not q.frozen and q.qparams is None
    assert q.weight.device.type == "cpu"
    # live forward does not touch the float weight; the wrapper can be undone
    w0 = lin.weight.detach().clone()
    q(torch.randn(3, 64))
    assert torch.equal(lin.weight, w0)
    back = q.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight


@pytest.mark.parametrize("fmt,gran", [("int4", "g32"), ("int3", "channel"), ("nf4", "g64"), ("mxfp4", None)])
def test_live_forward_is_fake_quantized_matmul(fmt, gran):
    lin = _linear(128, 24)
    spec = parse_spec(fmt, gran)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(y, F.linear(x, fake_quantize(lin.weight, spec), lin.bias))
        assert not torch.equal(y, lin(x))
    # live means min-max is recomputed: a changed weight gives a changed grid
    with torch.no_grad():
        lin.weight.mul_(1.7)
        assert torch.equal(q(x), F.linear(x, fake_quantize(lin.weight, spec), lin.bias))


def test_live_int4_matches_hand_oracle():
    lin = _linear(72, 16)  # ragged: groups of 32, 32, 8
    spec = parse_spec("int4", "g32")
    x = torch.randn(4, 72)
    with torch.no_grad():
        got = QuantLinear.from_linear(lin, spec)(x)
        want = F.linear(x, int_asym_oracle(lin.weight, 4, 32), lin.bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


FREEZE_SPECS = {
    "int4_g32_asym": lambda: parse_spec("int4", "g32"),
    "nf4_g64": lambda: parse_spec("nf4", "g64"),
    "mxfp4": lambda: parse_spec("mxfp4"),
    "gguf": lambda: parse_spec("int4", "gguf"),
}


@pytest.mark.parametrize("name", list(FREEZE_SPECS))
def test_freeze_stores_rtn_and_is_idempotent(name):
    spec = FREEZE_SPECS[name]()
    lin = _linear(512, 12, seed=3)  # two GGUF super-blocks per row
    w0 = lin.weight.detach().clone()
    q = QuantLinear.from_linear(lin, spec)
    with torch.no_grad():
        live_y = q(torch.ones(1, 512))
    qw = q.freeze()
    assert q.frozen and q.qparams is not None

    # weight == RTN dequantized weight (library RTN) == the hand oracle of the documented grid
    ref = quantize_weight(w0, spec)
    assert torch.equal(q.weight.detach(), ref.dequantize(torch.float32))
    assert torch.equal(qw.codes, ref.codes)
    if name == "int4_g32_asym":
        oracle = int_asym_oracle(w0, 4, 32)
    elif name == "nf4_g64":
        oracle = table_oracle(w0, torch.tensor(NF4_LEVELS), 64, pow2=False)
    elif name == "mxfp4":
        table = torch.tensor(sorted({-v for v in FP4_VALUES} | set(FP4_VALUES)))
        oracle = table_oracle(w0, table, 32, pow2=True)
    else:
        oracle = gguf_asym_oracle(w0)
    torch.testing.assert_close(q.weight.detach(), oracle, rtol=0, atol=1e-6)
    assert lin.weight is q.weight  # the shared Parameter now holds the quantized values

    # idempotence: the frozen weight re-quantized with the stored qparams gives the same codes
    codes = quantize(q.weight.detach(), q.qparams, spec)
    assert torch.equal(codes, qw.codes)
    assert torch.equal(fake_quantize(q.weight.detach(), spec, q.qparams), q.weight.detach())
    # and fresh min-max on the frozen weight finds the same grid again for the table/int formats
    assert torch.equal(fake_quantize(q.weight.detach(), spec), q.weight.detach())

    # frozen forward is a plain matmul with the stored weight, equal to the live one before freezing
    x = torch.randn(3, 512)
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, q.weight, q.bias))
        assert torch.equal(q(torch.ones(1, 512)), live_y)


def test_freeze_with_given_quantized_weight():
    lin = _linear(64, 8)
    spec = parse_spec("int4", "g32")
    qw = quantize_weight(lin.weight.detach() * 0.5, spec)
    q = QuantLinear.from_linear(lin, spec)
    q.freeze(qw)
    assert torch.equal(q.weight.detach(), qw.dequantize())
    assert torch.equal(q.w_scale, qw.qparams.scale)


def test_activation_quantizer_int8_per_token_and_qat_gradients():
    lin = _linear(64, 16, bias=False)
    w_spec, a_spec = parse_spec("int4", "g32"), parse_spec("int8", "token")
    q = QuantLinear.from_linear(lin, w_spec, a_spec)
    plain = QuantLinear.from_linear(lin, w_spec)
    torch.manual_seed(5)
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        y_a, y_w = q(x), plain(x)
        wq = int_asym_oracle(lin.weight, 4, 32)
        xq = int_asym_oracle(x, 8, 64)  # one asymmetric 8-bit grid per token
        torch.testing.assert_close(y_a, F.linear(xq, wq), rtol=0, atol=1e-5)
    rel = ((y_a - y_w).norm() / y_w.norm()).item()
    assert 0 < rel < 0.02, rel
    assert "act=" in q.extra_repr()

    # QAT: gradients reach the float weight through the straight-through estimator
    g = torch.randn_like(y_a)
    xr = x.clone().requires_grad_(True)
    (q(xr) * g).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # min-max grids clip nothing, so dL/dW = g^T x_q and dL/dx = g W_q exactly as for a plain matmul
    want_gw = torch.einsum("bto,bti->oi", g, xq)
    torch.testing.assert_close(lin.weight.grad, want_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, g @ wq, rtol=1e-5, atol=1e-5)

    # a step of SGD changes the weight and the next forward re-quantizes it
    with torch.no_grad():
        lin.weight -= 0.5 * lin.weight.grad
        torch.testing.assert_close(q(x), F.linear(xq, int_asym_oracle(lin.weight, 4, 32)), rtol=0, atol=1e-5)


def test_activation_only_quantization():
    """QuantConfig(act=...) alone: float weights, quantized inputs."""
    model = tiny_model("LlamaForCausalLM")
    ref = copy.deepcopy(model)
    quantize_model(model, QuantConfig(act=parse_spec("int8", "token")), progress=False)
    mods = quant_modules(model)
    assert len(mods) == 14 and all(m.w_spec is None and m.a_spec is not None for m in mods.values())
    assert "w=float" in repr(model.model.layers[0].mlp.down_proj)
    q = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 72)
    with torch.no_grad():
        torch.testing.assert_close(q(x), F.linear(int_asym_oracle(x, 8, 72), ref.model.layers[0].mlp.down_proj.weight),
                                   rtol=0, atol=1e-5)
        ids = torch.randint(0, 128, (1, 8))
        a, b = model(ids).logits, ref(ids).logits
    assert 0 < (a - b).abs().max() < 0.02 * b.abs().max()


def test_straight_through_gradient_is_zero_where_clipped():
    lin = _linear(32, 4, bias=False)
    spec = parse_spec("int4", "g32")
    q = QuantLinear.from_linear(lin, spec)
    q.freeze()
    q.frozen = False  # live with frozen qparams: values far outside the grid get no gradient
    with torch.no_grad():
        lin.weight[1, 2] = 10.0
    q(torch.ones(1, 32)).sum().backward()
    assert lin.weight.grad[1, 2] == 0
    assert (lin.weight.grad[0] != 0).all()


# ----------------------------------------------------------------------------------- replace_modules
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


def test_replace_modules_returns_names_and_honours_filter():
    m = _Toy()
    seen = []
    spec = parse_spec("int8", "channel")

    def fn(mod, name):
        seen.append(name)
        return QuantLinear.from_linear(mod, spec)

    names = replace_modules(m, fn, lambda mod, name: isinstance(mod, nn.Linear) and name != "b")
    assert names == ["a", "inner.0", "inner.2"] and seen == names
    assert isinstance(m.a, QuantLinear) and isinstance(m.inner[0], QuantLinear) and isinstance(m.inner[2], QuantLinear)
    assert type(m.b) is nn.Linear and type(m.inner[1]) is nn.ReLU
    assert list(quant_modules(m)) == names
    assert replace_modules(m, fn, lambda mod, name: False) == []
    # already-quantized modules are not wrapped twice by the block filter either
    assert m(torch.randn(2, 8)).shape == (2, 4)


def test_block_filter_skip():
    model = tiny_model("LlamaForCausalLM")
    names = replace_modules(model, lambda mod, n: QuantLinear.from_linear(mod, parse_spec("int8", "channel")),
                            block_linear_filter(model, skip=("mlp.down_proj", "self_attn.o_proj")))
    assert len(names) == 2 * 5
    assert all(not n.endswith(("down_proj", "o_proj")) for n in names)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    # a second pass finds nothing left to wrap except what was skipped
    again = replace_modules(model, lambda mod, n: mod, block_linear_filter(model))
    skipped = (f"model.layers.{i}.{s}" for i in range(2) for s in ("mlp.down_proj", "self_attn.o_proj"))
    assert sorted(again) == sorted(skipped)


# ---------------------------------------------------------------------------------- tied embeddings
def _check_tied(model):
    arch = arch_of(model)
    emb, head = model.get_submodule(arch.embed), model.get_submodule(arch.head)
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert emb.weight is head.weight  # one tensor
    assert emb.frozen and head.frozen
    for f in ("w_scale", "w_zero"):
        a, b = getattr(emb, f), getattr(head, f)
        assert a is not None and torch.equal(a, b)
    return emb, head


def test_tied_gemma2_embed_spec_quantizes_both_once():
    model = tiny_model("Gemma2ForCausalLM")
    assert tied_embeddings(model)
    ref = copy.deepcopy(model)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    cfg = QuantConfig(weight=parse_spec("int4", "g32"), embed=parse_spec("int8", "channel"))
    quantize_model(model, cfg, progress=False)
    emb, head = _check_tied(model)
    assert torch.equal(emb.weight.detach(), int_asym_oracle(emb0, 8, 64))

    # the whole model == the float model with hand-quantized weights (keeps Gemma's embedding scale)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(int_asym_oracle(emb0, 8, 64))
        for n, m in ref.named_modules():
            if isinstance(m, nn.Linear) and n.startswith("model.layers."):
                m.weight.copy_(int_asym_oracle(m.weight, 4, 32))
        ids = torch.randint(0, 128, (2, 10))
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        e = model.model.embed_tokens(ids)
        torch.testing.assert_close(e, F.embedding(ids, emb.weight) * 8.0)  # sqrt(hidden 64)


def test_tied_head_spec_alone_also_quantizes_embedding():
    model = tiny_model("Gemma2ForCausalLM")
    emb0 = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, QuantConfig(head=parse_spec("int4", "channel")), progress=False)
    emb, _ = _check_tied(model)
    assert torch.equal(emb.weight.detach(), int_asym_oracle(emb0, 4, 64))
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.startswith("model.layers"))


def test_tied_different_specs_raise():
    model = tiny_model("Gemma2ForCausalLM")
    with pytest.raises(ValueError, match="tied"):
        quantize_model(model, QuantConfig(embed=parse_spec("int8", "channel"), head=parse_spec("int4", "g32")),
                       progress=False)
    model = tiny_model("Gemma2ForCausalLM")
    quantize_model(model, QuantConfig(embed=parse_spec("int8", "channel"), head=parse_spec("int8", "channel")),
                   progress=False)
    _check_tied(model)


def test_untied_embed_and_head_are_separate():
    model = tiny_model("LlamaForCausalLM")
    emb0, head0 = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    quantize_model(model, QuantConfig(embed=parse_spec("int8", "channel"), head=parse_spec("int4", "g32")),
                   progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and emb.weight is not head.weight
    assert torch.equal(emb.weight.detach(), int_asym_oracle(emb0, 8, 64))
    assert torch.equal(head.weight.detach(), int_asym_oracle(head0, 4, 32))


@needs_shared
def test_tied_stories260k():
    model, _ = load_model(STORIES / "hf")
    emb0 = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32"), embed=parse_spec("int8", "channel")),
                   progress=False)
    emb, _ = _check_tied(model)
    assert torch.equal(emb.weight.detach(), int_asym_oracle(emb0, 8, 64))
    with pytest.raises(ValueError):
        quantize_model(load_model(STORIES / "hf")[0],
                       QuantConfig(embed=parse_spec("int8", "channel"), head=parse_spec("int6", "channel")),
                       progress=False)


def test_a_clip_applies_to_any_method_and_is_validated(tiny_llama):
    """--opt a_clip=r shrinks every activation range (scale * r) whatever the method; bad values are refused."""
    import copy

    import pytest

    from lowbit.config import QuantConfig, parse_spec
    from lowbit.quantize import quantize_model

    act = parse_spec("int4", "token", symmetric=True)
    ids = torch.randint(0, 128, (1, 12))
    outs = []
    for r in (1.0, 0.8):
        m = quantize_model(copy.deepcopy(tiny_llama), QuantConfig(act=act, extra={"a_clip": r}), progress=False)
        assert {q.a_clip for q in m.modules() if isinstance(q, QuantLinear)} == {r}
        outs.append(m(ids).logits)
    assert not torch.allclose(outs[0], outs[1])
    for bad, cfg in ((1.5, QuantConfig(act=act, extra={"a_clip": 1.5})),
                     (0.9, QuantConfig(weight=parse_spec("int4"), extra={"a_clip": 0.9}))):
        with pytest.raises(ValueError, match="a_clip"):
            quantize_model(copy.deepcopy(tiny_llama), cfg, progress=False)
