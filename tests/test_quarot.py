"""QuaRot: Hadamard constructions, exact equivalence of every rotation step, W4A4 gains, export."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import STORIES, needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.hadamard import (fwht, hadamard_matrix, hadamard_transform, has_hadamard, kron_transform, paley1, paley2,
                             random_hadamard, random_orthogonal, rotation_factor, rotation_matrix, sylvester)
from lowbit.models import tied_embeddings
from lowbit.qmodules import QuantLinear
from lowbit.quantize import quantize_model
from lowbit.quantizer import compute_qparams, fake_quantize
from lowbit.quarot import SUPPORTED, fuse_norms, rotate_ffn_online, rotate_model, rotate_vo

W4 = parse_spec("int4", "channel")
A4 = parse_spec("int4", "token", symmetric=True)
EYE = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731


# ------------------------------------------------------------------------------------ hadamard
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 28, 36, 44, 48, 64, 72, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, n * EYE(n))
    R = rotation_matrix(n)  # the normalized rotation the transforms use
    assert torch.allclose(R @ R.T, EYE(n), atol=1e-12)
    assert torch.allclose(R.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-12)
    assert rotation_factor(n)[1]


def test_paley_constructions_and_their_limits():
    assert torch.equal(paley1(11) @ paley1(11).T, 12 * EYE(12))
    assert torch.equal(paley1(43) @ paley1(43).T, 44 * EYE(44))
    assert torch.equal(paley2(17) @ paley2(17).T, 36 * EYE(36))
    for bad in (lambda: paley1(13), lambda: paley2(11), lambda: paley1(15), lambda: sylvester(12)):
        with pytest.raises(ValueError):
            bad()
    # 576 = 36 * 16 (Paley II, q = 17) and 1536 = 12 * 128 (Paley I, q = 11): small dense factors
    assert rotation_factor(576)[0].shape == (36, 36) and rotation_factor(1536)[0].shape == (12, 12)
    assert rotation_factor(64)[0].shape == (1, 1)
    assert not has_hadamard(172) and not has_hadamard(9)
    with pytest.raises(ValueError, match="no Hadamard construction of order 172"):
        hadamard_matrix(172)


@pytest.mark.parametrize("n", [9, 172])
def test_random_orthogonal_fallback(n, caplog):
    with caplog.at_level("INFO", logger="lowbit.hadamard"):
        K, is_hadamard = rotation_factor(n, seed=3)
    assert not is_hadamard and K.shape == (n, n) and "random orthogonal" in caplog.text
    assert torch.allclose(K @ K.T, EYE(n), atol=1e-12)
    assert torch.equal(K, rotation_factor(n, seed=3)[0]) and not torch.equal(K, rotation_factor(n, seed=4)[0])
    assert torch.allclose(random_orthogonal(n, 1).T @ random_orthogonal(n, 1), EYE(n), atol=1e-12)


@pytest.mark.parametrize("n", [1, 8, 64, 128, 12, 576, 1536, 172])
def test_fast_transform_equals_matrix_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    R = rotation_matrix(n)
    assert torch.allclose(hadamard_transform(x), x @ R, atol=1e-12)
    assert torch.allclose(hadamard_transform(x.transpose(1, 2), dim=1), (x @ R).transpose(1, 2), atol=1e-12)
    if n & (n - 1) == 0:
        assert torch.allclose(fwht(x, normalize=False), x @ sylvester(n), atol=1e-10)


def test_kron_transform_identity_inner_and_random_hadamard():
    K = rotation_matrix(4)
    x = torch.randn(7, 4 * 8, dtype=torch.float64)
    assert torch.allclose(kron_transform(x, K, "identity"), x @ torch.kron(K, EYE(8)), atol=1e-12)
    assert torch.allclose(kron_transform(x, K, "hadamard"), x @ torch.kron(K, rotation_matrix(8)), atol=1e-12)
    Q = random_hadamard(576, seed=1)
    assert torch.allclose(Q @ Q.T, EYE(576), atol=1e-12)
    assert torch.allclose(Q.abs(), torch.full_like(Q, 576 ** -0.5), atol=1e-12)
    assert not torch.equal(Q, random_hadamard(576, seed=2))


# ---------------------------------------------------------------------------- equivalence steps
def _random_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
    return model


def _tiny(arch, tied=False):
    model = tiny_model(arch)
    if tied:  # share the head with the embedding, as SmolLM2 and stories260K do
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return _random_norms(model.double())


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch,tied", [("LlamaForCausalLM", False), ("LlamaForCausalLM", True),
                                       ("Qwen3ForCausalLM", False), ("Qwen3ForCausalLM", True)])
def test_fuse_norms_keeps_logits(arch, tied):
    model = _tiny(arch, tied)
    assert tied_embeddings(model) == tied
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    fuse_norms(model)
    assert _rel(_logits(model, ids), ref) < 1e-12
    norms = [model.model.norm] + [getattr(b, n) for b in model.model.layers
                                  for n in ("input_layernorm", "post_attention_layernorm")]
    assert all(bool((n.weight == 1).all()) for n in norms)
    assert not tied_embeddings(model) and model.config.tie_word_embeddings is False


@pytest.mark.parametrize("arch,tied", [("LlamaForCausalLM", False), ("LlamaForCausalLM", True),
                                       ("Qwen3ForCausalLM", True), ("Qwen2ForCausalLM", False),
                                       ("MistralForCausalLM", False)])
def test_full_rotation_keeps_logits(arch, tied):
    """fuse + rotate + online down_proj Hadamard + V/O per-head fusion + online head mixing (fp64 weights;
    the RMSNorms compute in fp32, hence ~1e-7)."""
    model = _tiny(arch, tied)
    if arch == "Qwen2ForCausalLM":  # q/k/v biases: v's rotates per head
        with torch.no_grad():
            for b in model.model.layers:
                b.self_attn.v_proj.bias.normal_()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    fuse_norms(model)
    E = model.model.embed_tokens.weight.detach().clone()
    rotate_model(model, seed=1)
    assert torch.allclose(model.model.embed_tokens.weight, E @ random_hadamard(64, seed=1), atol=1e-12)
    assert _rel(_logits(model, ids), ref) < 1e-5
    rotate_ffn_online(model)
    rotate_vo(model, online_heads=True)
    assert _rel(_logits(model, ids), ref) < 1e-5
    layer = model.model.layers[0]
    down, o = layer.mlp.down_proj, layer.self_attn.o_proj
    # a float down_proj is wrapped to carry its online rotation; 72 = 36 (Paley II, q = 17) x 2
    assert isinstance(down, QuantLinear) and down.w_spec is None and down.in_rot.shape == (36, 36)
    assert isinstance(o, QuantLinear) and o.in_rot.shape == (4, 4) and o.in_rot_inner == "identity"


def test_rotate_model_needs_fused_norms():
    model = _tiny("LlamaForCausalLM")
    with pytest.raises(ValueError, match="fuse_norms"):
        rotate_model(model)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM"])
def test_unsupported_architectures(arch):
    model = tiny_model(arch)
    with pytest.raises(ValueError) as e:
        fuse_norms(model)
    msg = str(e.value)
    assert "\n" not in msg and arch in msg and all(s in msg for s in SUPPORTED)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        quantize_model(tiny_model(arch), QuantConfig(weight=W4, method="quarot,rtn"), progress=False)


# ------------------------------------------------------------------------------------ QuantLinear
def test_quantlinear_input_transform_and_a_clip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 5)
    q = QuantLinear.from_linear(lin, None, None)
    x = torch.randn(3, 24)
    K = rotation_matrix(3).float()
    q.set_input_transform(K, "hadamard")
    R = torch.kron(K, rotation_matrix(8).float())
    assert torch.allclose(q(x), x @ R @ lin.weight.T + lin.bias, atol=1e-5)
    seen = []
    q.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))  # what GPTQ's Hessian hook sees
    q(x)
    assert torch.allclose(seen[0], x @ R, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        q.set_input_transform(torch.eye(5), "hadamard")
    q.set_input_transform(None)
    assert torch.allclose(q(x), lin(x))
    q.a_spec, q.a_clip = A4, 0.9
    qp = compute_qparams(x, A4)
    qp.scale = qp.scale * 0.9
    assert torch.equal(q(x), torch.nn.functional.linear(fake_quantize(x, A4, qp), lin.weight, lin.bias))
    assert "a_clip=0.9" in repr(q)


# ------------------------------------------------------------------------------ recipes, export
def test_quarot_gptq_recipe_and_seed_option():
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    a = quantize_model(tiny_model(), QuantConfig(weight=W4, act=A4, method="quarot,gptq"), calib=calib,
                       progress=False)
    mods = [m for n, m in a.named_modules() if isinstance(m, QuantLinear)]
    assert len(mods) == 14 and all(m.frozen for m in mods)
    assert a.model.layers[1].mlp.down_proj.in_rot is not None
    ids = torch.randint(0, 128, (1, 16))
    assert torch.isfinite(_logits(a, ids)).all()
    b = quantize_model(tiny_model(), QuantConfig(weight=W4, method="quarot,rtn", seed=0, extra={"quarot_seed": 5}),
                       progress=False)
    c = quantize_model(tiny_model(), QuantConfig(weight=W4, method="quarot,rtn", seed=5), progress=False)
    assert torch.equal(b.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_load_roundtrip_identical_logits(tmp_path):
    from lowbit.export import load_quantized, save_quantized
    from test_export import toy_tokenizer

    model = _random_norms(tiny_model())
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: quarot unties it
    model.config.tie_word_embeddings = True
    cfg = QuantConfig(weight=W4, act=A4, embed=parse_spec("int8", "channel"), method="quarot,rtn",
                      extra={"a_clip": 0.9})
    quantize_model(model, cfg, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.frozen and cfg.head == cfg.embed
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    out = save_quantized(model, tmp_path / "q", toy_tokenizer(), float_dtype=torch.float32)
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["modules"]["model.layers.0.mlp.down_proj"]["in_rot"] == "hadamard"
    assert meta["modules"]["model.layers.0.self_attn.o_proj"]["in_rot"] == "identity"
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["a_clip"] == 0.9
    loaded, _ = load_quantized(out)
    assert not tied_embeddings(loaded) and isinstance(loaded.lm_head, QuantLinear)
    assert loaded.model.layers[0].mlp.down_proj.a_clip == 0.9
    assert torch.equal(_logits(loaded, ids), ref)


# -------------------------------------------------------------------------------- stories260K
@pytest.fixture(scope="module")
def stories():
    from lowbit.models import load_model

    return load_model(STORIES / "hf")


@needs_shared
def test_stories260k_rotation_is_exact_and_spreads_outliers(stories):
    from lowbit.size import size_report

    model = copy.deepcopy(stories[0])
    assert tied_embeddings(model)
    ids = torch.randint(3, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    stats = []

    def hook(mod, args, kw):
        h = (args[0] if args else kw["hidden_states"]).reshape(-1, 64).double()
        rms = h.pow(2).mean(-1).sqrt()
        kurt = (h.pow(4).mean(-1) / h.pow(2).mean(-1).pow(2))
        stats.append(((h.abs().amax(-1) / rms).mean().item(), kurt.mean().item()))

    def block_stats(m):
        stats.clear()
        hs = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in m.model.layers]
        out = _logits(m, ids)
        for h in hs:
            h.remove()
        return out, [s for s in stats]

    ref, before = block_stats(model)
    fuse_norms(model)
    assert _rel(_logits(model, ids), ref) < 1e-5
    rotate_model(model, 0)
    rotate_ffn_online(model)
    rotate_vo(model)
    out, after = block_stats(model)
    assert _rel(out, ref) < 1e-4
    # outliers spread: max/RMS and kurtosis of the residual stream entering blocks 1.. drop
    mr_b, mr_a = sum(s[0] for s in before[1:]) / 4, sum(s[0] for s in after[1:]) / 4
    k_b, k_a = sum(s[1] for s in before[1:]) / 4, sum(s[1] for s in after[1:]) / 4
    assert mr_a < 0.8 * mr_b and k_a < 0.6 * k_b, (mr_b, mr_a, k_b, k_a)
    # the untied head is counted on its own
    rep = size_report(model)
    assert rep["parts"]["head"]["params"] == 512 * 64 == rep["parts"]["embeddings"]["params"]


@needs_shared
def test_stories260k_w4a4_quarot_beats_rtn(stories):
    from lowbit.data import eval_ids
    from lowbit.eval import perplexity

    base, tok = stories
    ids = eval_ids("tinystories", tok, 512)
    ppl = {}
    for method in ("rtn", "quarot,rtn"):
        m = quantize_model(copy.deepcopy(base), QuantConfig(weight=W4, act=A4, method=method), progress=False)
        ppl[method] = perplexity(m, ids, 512, max_windows=8, progress=False)["ppl"]
    # measured: rtn 8.90, quarot,rtn 7.25 (fp32 5.30)
    assert math.isfinite(ppl["quarot,rtn"]) and ppl["quarot,rtn"] < 0.9 * ppl["rtn"], ppl
