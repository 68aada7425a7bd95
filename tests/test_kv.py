"""KV-cache quantization (issue 4, LLM-QAT's W4A8KV4): the output quantizer of the key/value projections
against quantize-dequantize and a hand-written hook reference, causality (cached decoding), export, the
CLI flags, and data-free QAT with activation and KV quantization on."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.models import arch_of, blocks, head_dim
from lowbit.qmodules import QuantLinear, quant_modules
from lowbit.quantize import kv_linears, quantize_model
from lowbit.quantizer import compute_qparams, dequantize, quantize

KV4 = parse_spec("int4", "token", symmetric=True)  # LLM-QAT: per token over all heads, symmetric
A8 = parse_spec("int8", "token", symmetric=True)
W4 = parse_spec("int4", "g32")


def _ids(n=2, length=16, seed=0, vocab=128):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _qdq(x: torch.Tensor, spec) -> torch.Tensor:
    """The oracle: quantize then dequantize with the min-max qparams of ``x`` itself."""
    qp = compute_qparams(x, spec)
    return dequantize(quantize(x, qp, spec), qp, spec).to(x.dtype)


@pytest.mark.parametrize("spec", [KV4, parse_spec("int4", "g8", symmetric=True), parse_spec("int8", "token"),
                                  parse_spec("fp8_e4m3", "token")])
def test_output_quantizer_is_quantize_dequantize_with_straight_through_gradient(spec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 32)
    q = QuantLinear.from_linear(copy.deepcopy(lin), None, out_spec=spec)
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = q(x)
    ref = _qdq(F.linear(x.detach(), lin.weight.detach(), lin.bias.detach()), spec)
    assert torch.equal(y.detach(), ref)
    assert not torch.equal(ref, F.linear(x, lin.weight, lin.bias).detach())  # it did quantize something
    # straight through: d y / d (x W^T + b) is 1 where the value is inside the grid's range, else 0. Symmetric
    # min-max ranges clip nothing; an asymmetric grid's rounded zero-point can push a token's extreme value
    # more than half a step past the last code, which is then clamped (no gradient)
    g = torch.randn_like(y)
    y.backward(g)
    out = F.linear(x.detach(), lin.weight.detach(), lin.bias.detach())
    if spec.symmetric:
        mask = torch.ones_like(out)
    else:  # per token: one scale per row
        s = compute_qparams(out, spec).scale.reshape(-1, 1).expand(-1, out.shape[-1]).reshape(out.shape)
        mask = ((out - ref).abs() <= 0.5 * s * (1 + 1e-5)).float()
        assert 0.5 < mask.mean() < 1
    x2 = x.detach().clone().requires_grad_(True)
    lin.zero_grad()
    F.linear(x2, lin.weight, lin.bias).backward(g * mask)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, lin.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, lin.bias.grad, rtol=0, atol=1e-6)
    assert "out=" in repr(q)


def _hooked_reference(model, spec):
    """Forward hooks written by hand on every k/v projection: output <- quantize-dequantize(output)."""
    ref = copy.deepcopy(model)
    arch = arch_of(ref)
    names = []
    for i, blk in enumerate(blocks(ref)):
        for rel in arch.kv:
            blk.get_submodule(rel).register_forward_hook(lambda mod, args, out: _qdq(out, spec))
            names.append(f"{arch.layers}.{i}.{rel}")
    return ref, names


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM"])
def test_kv_only_model_matches_hook_reference(arch):
    model = tiny_model(arch)
    spec = KV4 if arch != "Gemma2ForCausalLM" else parse_spec("int4", f"g{head_dim(model)}", symmetric=False)
    ref, names = _hooked_reference(model, spec)
    q = quantize_model(copy.deepcopy(model), QuantConfig(kv=spec), progress=False)
    assert kv_linears(q) == names and len(names) == 2 * model.config.num_hidden_layers
    mods = quant_modules(q)
    assert sorted(mods) == sorted(names)  # only the key/value projections were touched, weights in float
    for n in names:
        m = mods[n]
        assert m.out_spec == spec and m.w_spec is None and m.a_spec is None and not m.frozen
        assert m.weight is model.get_submodule(n).weight or torch.equal(m.weight, model.get_submodule(n).weight)
    ids = _ids(seed=1)
    with torch.no_grad():
        got, want, fp = q(ids).logits, ref(ids).logits, model(ids).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got, fp)  # 4-bit keys and values change the output


def test_w4a8kv4_matches_hook_reference_on_the_w4a8_model():
    model = tiny_model()
    w4a8 = quantize_model(copy.deepcopy(model), QuantConfig(weight=W4, act=A8), progress=False)
    ref, _ = _hooked_reference(w4a8, KV4)
    q = quantize_model(copy.deepcopy(model), QuantConfig(weight=W4, act=A8, kv=KV4), progress=False)
    outs = {n: m.out_spec for n, m in quant_modules(q).items()}
    assert {n for n, s in outs.items() if s is not None} == set(kv_linears(q))
    assert all(m.frozen and m.a_spec == A8 for m in quant_modules(q).values())
    ids = _ids(seed=2)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref(ids).logits)
    assert "KV[int4 token sym]" in q.lowbit_config.describe()


def test_skipped_projection_is_still_kv_quantized():
    """``skip`` keeps a projection's weights in float; what it writes into the cache is still quantized."""
    model = tiny_model()
    q = quantize_model(copy.deepcopy(model), QuantConfig(weight=W4, kv=KV4, skip=("self_attn.v_proj",)),
                       progress=False)
    v = q.model.layers[0].self_attn.v_proj
    assert isinstance(v, QuantLinear) and v.w_spec is None and v.out_spec == KV4
    assert torch.equal(v.weight, model.model.layers[0].self_attn.v_proj.weight)


def test_per_token_scales_are_causal_cached_decoding_equals_full_forward():
    model = tiny_model()
    q = quantize_model(model, QuantConfig(weight=W4, act=A8, kv=parse_spec("int4", "g16")), progress=False)
    ids = _ids(1, 12, seed=3)
    with torch.no_grad():
        full = q(ids).logits
        out = q(ids[:, :6], use_cache=True)
        steps, past = [out.logits], out.past_key_values
        for t in range(6, 12):
            out = q(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            steps.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gran, words", [("tensor", "not per token"), ("peg4", "not per token"),
                                         ("channel", "not per token"), ("g64", "larger than the row length 32")])
def test_bad_kv_granularity_is_refused(gran, words):
    spec = parse_spec("int4", gran)
    with pytest.raises(ValueError, match=words):
        quantize_model(tiny_model(), QuantConfig(kv=spec), progress=False)


def test_kv_config_json_round_trip():
    cfg = QuantConfig(weight=W4, act=A8, kv=parse_spec("int4", "g8", symmetric=False))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["kv"]["granularity"] == "g8" and d["kv"]["symmetric"] is False
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict({"weight": d["weight"]}).kv is None  # configs written before kv existed


@pytest.mark.parametrize("cfg", [QuantConfig(weight=W4, act=A8, kv=KV4),
                                 QuantConfig(kv=parse_spec("int8", "g16", symmetric=False))],
                         ids=["w4a8kv4", "kv8-only"])
def test_export_round_trip_is_exact(tmp_path, cfg):
    from lowbit.export import load_quantized, save_quantized
    from test_export import toy_tokenizer

    q = quantize_model(tiny_model(), cfg, progress=False)
    d = save_quantized(q, tmp_path / "q", tokenizer=toy_tokenizer(), float_dtype=torch.float32)
    back, _ = load_quantized(d)
    mods, mods2 = quant_modules(q), quant_modules(back)
    assert list(mods2) == list(mods)
    for n, m in mods.items():
        r = mods2[n]
        assert (r.w_spec, r.a_spec, r.out_spec, r.frozen) == (m.w_spec, m.a_spec, m.out_spec, m.frozen), n
        assert torch.equal(r.weight, m.weight), n
    assert back.lowbit_config == q.lowbit_config
    ids = _ids(2, 20, seed=6)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)
    meta = json.loads((d / "quant_config.json").read_text())
    outs = {n: e.get("out") for n, e in meta["modules"].items()}
    assert {n for n, o in outs.items() if o} == set(kv_linears(q))
    assert all(o["format"] == cfg.kv.fmt.name for o in outs.values() if o)
    assert meta["config"]["kv"] == QuantConfig.from_dict(meta["config"]).to_dict()["kv"]


def test_float_teacher_of_dfqat_quantizes_nothing():
    """dfqat's teacher is the float function: no weight, activation or KV quantizer survives the copy."""
    from lowbit.dfqat import _live, float_teacher

    model = tiny_model()
    live = copy.deepcopy(model)
    for name in kv_linears(live):
        parent, _, attr = name.rpartition(".")
        setattr(live.get_submodule(parent), attr,
                QuantLinear.from_linear(live.get_submodule(name), W4, A8, out_spec=KV4))
    assert len(_live(live)) == len(kv_linears(live))
    ids = _ids(seed=4)
    with torch.no_grad():
        assert not torch.allclose(live(ids).logits, model(ids).logits)
        assert torch.equal(float_teacher(live)(ids).logits, model(ids).logits)


def test_dfqat_w4a8kv4_tiny_llama_exact_export(tmp_path):
    from lowbit.export import load_quantized, save_quantized
    from test_export import toy_tokenizer

    model = tiny_model()
    cfg = QuantConfig(weight=W4, act=A8, kv=KV4, method="dfqat",
                      extra={"dfqat_tile": 1, "dfqat_tile_steps": 6, "dfqat_e2e_steps": 4, "dfqat_batch": 4,
                             "dfqat_lr": 3e-4, "dfqat_q_lr": 1e-4,  # pinned: a random tiny model's weights are small
                             "dfqat_e2e_lr": 3e-5, "dfqat_e2e_q_lr": 1e-5})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = quantize_model(model, cfg, calib=_ids(4, 32), progress=False)
    rep = q.dfqat_report
    for t in rep["tiles"]:
        assert t["loss_last"] < t["loss_first"] and t["rel_mse_after"] < t["rel_mse_before"]
    assert len(rep["e2e"]["losses"]) == 4 and rep["e2e"]["retries"] == 0  # its KD decrease: the stories260K test
    for n, m in quant_modules(q).items():
        assert m.frozen and getattr(m, "learner", None) is None and m.a_spec == A8, n
        assert (m.out_spec == KV4) == (n in kv_linears(q)), n
        codes = quantize(m.weight, m.qparams, m.w_spec)
        assert torch.equal(dequantize(codes, m.qparams, m.w_spec), m.weight.detach()), n
    # the key/value projections trained too (their gradients pass the output quantizer)
    for n in kv_linears(q):
        assert not torch.equal(q.get_submodule(n).weight, before[f"{n}.weight"]), n
    save_quantized(q, tmp_path / "q", tokenizer=toy_tokenizer(), float_dtype=torch.float32)
    back, _ = load_quantized(tmp_path / "q")
    assert all(back.get_submodule(n).out_spec == KV4 for n in kv_linears(q))
    ids = _ids(2, 24, seed=5)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, q(ids).logits)


@needs_shared
def test_dfqat_w4a8kv4_stories260k_reduces_kd_loss():
    """W4A8KV4 (int4 per-channel symmetric weights, int8 per-token activations, int4 per-token keys and values)
    on stories260K with 8 x 64 self-generated ids, 4 steps per tile and 6 end-to-end steps."""
    import lowbit
    from lowbit.calib import self_generated_batches

    model, tok = lowbit.load_model("stories260k")
    ids = self_generated_batches(model, tok, n=8, seqlen=64, seed=0, progress=False)
    cfg = QuantConfig(weight=parse_spec("int4", "channel", symmetric=True), act=A8, kv=KV4, method="dfqat",
                      extra={"dfqat_tile_steps": 4, "dfqat_e2e_steps": 6})
    q = quantize_model(model, cfg, calib=ids, progress=False)
    rep = q.dfqat_report
    assert [t["blocks"] for t in rep["tiles"]] == [[0, 2], [3, 4]]
    assert all(t["rel_mse_after"] < t["rel_mse_before"] for t in rep["tiles"])
    assert rep["e2e"]["kd_after"] < rep["e2e"]["kd_before"], rep["e2e"]
    assert all(m.frozen for m in quant_modules(q).values())
    assert sum(m.out_spec is not None for m in quant_modules(q).values()) == 10


# ------------------------------------------------------------------------------------------------ CLI
@needs_shared
def test_cli_kv_flags_save_and_reload(tmp_path, capsys):
    from test_cli import run

    out, js = tmp_path / "kv", tmp_path / "kv.json"
    code, stdout, err = run(["quantize", "stories260k", "--w-format", "int4", "--w-sym", "--a-format", "int8",
                             "--kv", "int4", "--kv-granularity", "head", "--kv-asym", "--eval", "tinystories",
                             "--max-windows", "2", "--out", str(out), "--save-dtype", "float32", "--json", str(js)],
                            capsys)
    assert code == 0, err
    rec = json.loads(js.read_text())
    assert rec["config"]["kv"]["granularity"] == "g8" and rec["config"]["kv"]["symmetric"] is False  # head width 8
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["modules"]["model.layers.0.self_attn.k_proj"]["out"]["format"] == "int4"
    assert meta["modules"]["model.layers.0.self_attn.q_proj"].get("out") is None
    code, stdout, err = run(["info", str(out)], capsys)
    assert code == 0 and "KV[int4 g8 asym]" in stdout
    js2 = tmp_path / "e.json"
    code, _, err = run(["eval", str(out), "--tasks", "tinystories", "--max-windows", "2", "--json", str(js2)], capsys)
    assert code == 0, err
    assert json.loads(js2.read_text())["metrics"]["tinystories"]["ppl"] == rec["metrics"]["tinystories"]["ppl"]


@needs_shared
@pytest.mark.parametrize("argv, words", [
    (["--kv", "int9"], ["--kv", "bit-width"]),
    (["--kv", "int4", "--kv-granularity", "channel"], ["not per token"]),
    (["--kv", "int4", "--kv-granularity", "tensor"], ["not per token"]),
    (["--kv", "int4", "--kv-granularity", "g64"], ["larger than the row length 32"]),
    (["--kv", "int4", "--kv-granularity", "bogus"], ["unknown granularity"]),
    (["--kv", "bcq2", "--kv-granularity", "g8"], ["BCQ"]),
    (["--kv-granularity", "head"], ["need a KV-cache format"]),
    (["--kv-asym"], ["need a KV-cache format"]),
])
def test_cli_bad_kv_values_are_one_line(argv, words, capsys):
    from test_cli import assert_one_line_error, run

    code, _, err = run(["quantize", "stories260k", "--w-format", "int4", *argv], capsys)
    assert_one_line_error(code, err, *words)
