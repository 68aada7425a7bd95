"""save_quantized / load_quantized: bit-exact round trips, byte counts of the file, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.export import load_quantized, save_quantized
from lowbit.models import load_model, tied_embeddings
from lowbit.qmodules import QuantEmbedding, QuantLinear, quant_modules
from lowbit.quantize import quantize_model
from lowbit.quantizer import storage_bits
from lowbit.size import size_report
from lowbit.tokenizer import HFTokenizer, SPTokenizer

QSUFFIXES = ("qweight", "scale", "scale_e8m0", "zero", "super_scale", "sub_scale", "super_min", "sub_min")


def toy_tokenizer() -> HFTokenizer:
    """A 128-word transformers tokenizer built in memory (tiny models' vocabulary)."""
    from tokenizers import Tokenizer as TkTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tk = TkTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return HFTokenizer(fast, "toy")


def _file_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _quant_bytes(tensors: dict, name: str) -> dict[str, int]:
    return {k.rsplit(".", 1)[1]: t.numel() * t.element_size() for k, t in tensors.items()
            if k.rsplit(".", 1)[0] == name and k.rsplit(".", 1)[1] in QSUFFIXES}


def _ceil8(bits: int) -> int:
    return -(-bits // 8)


def _expected_bytes(shape, fmt: str, bits: int, g: int, sym: bool) -> dict[str, int]:
    """Hand-written stored sizes of one quantized weight (out, in)."""
    rows, n = shape
    groups = rows * -(-n // g)
    if fmt == "mx":
        return {"qweight": _ceil8(rows * n * bits), "scale_e8m0": groups}
    if fmt == "gguf":  # 32-value sub-blocks, 6-bit sub scales, fp16 super scale per 8 sub-blocks
        subs = -(-n // 32)
        supers = rows * -(-subs // 8)
        out = {"qweight": _ceil8(rows * n * bits), "super_scale": 2 * supers, "sub_scale": _ceil8(rows * subs * 6)}
        if not sym:
            out |= {"super_min": 2 * supers, "sub_min": _ceil8(rows * subs * 6)}
        return out
    out = {"qweight": _ceil8(rows * n * bits), "scale": 2 * groups}
    if not sym:
        out["zero"] = _ceil8(groups * bits)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _roundtrip_checks(model, tmp_path, tok=None, ids=None):
    """fp32 save: identical logits; fp16 save: identical quantized weights. Returns the fp16 folder."""
    ids = ids if ids is not None else torch.randint(0, model.config.vocab_size, (2, 12),
                                                     generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    mods = quant_modules(model)
    tok = tok if tok is not None else toy_tokenizer()

    d32 = save_quantized(model, tmp_path / "fp32", tokenizer=tok, float_dtype=torch.float32)
    m32, tok32 = load_quantized(d32)
    assert type(tok32) is type(tok) and tok32.encode("w5 w7 w9") == tok.encode("w5 w7 w9")
    assert torch.equal(_logits(m32, ids), want)
    mods32 = quant_modules(m32)
    assert list(mods32) == list(mods)
    for n, m in mods.items():
        r = mods32[n]
        assert type(r) is type(m) and r.frozen == m.frozen and r.w_spec == m.w_spec
        assert getattr(r, "a_spec", None) == getattr(m, "a_spec", None)
        assert getattr(r, "out_spec", None) == getattr(m, "out_spec", None), n
        assert torch.equal(r.weight, m.weight), n
        for f in ("w_scale", "w_zero", "w_super_scale", "w_super_min"):
            a, b = getattr(m, f), getattr(r, f)
            assert (a is None) == (b is None) and (a is None or torch.equal(a.float(), b.float())), (n, f)
    assert m32.lowbit_config.to_dict() == model.lowbit_config.to_dict()
    assert tied_embeddings(m32) == tied_embeddings(model)

    d16 = save_quantized(model, tmp_path / "fp16", tokenizer=tok)
    m16, _ = load_quantized(d16)
    q16 = quant_modules(m16)
    qids = {id(m.weight) for m in mods.values() if m.w_spec is not None}
    for n, m in mods.items():
        if m.w_spec is not None:
            assert torch.equal(q16[n].weight, m.weight), n
    sd16 = dict(m16.named_parameters())
    for n, p in model.named_parameters():
        if id(p) not in qids:
            assert torch.equal(sd16[n], p.detach().half().float()), n
    torch.testing.assert_close(_logits(m16, ids), want, rtol=2e-2, atol=2e-2)
    meta = json.loads((d16 / "quant_config.json").read_text())
    assert meta["float_dtype"] == "float16" and meta["format_version"] == 1
    return d16


def _check_file_bytes(model, folder, expected: dict[str, dict[str, int]]):
    """Every quantized tensor has exactly the hand-computed size; totals match size_report."""
    tensors = _file_tensors(folder / "model.safetensors")
    rep = size_report(model)
    qbits_report, n_packed = 0, 0
    for name, exp in expected.items():
        got = _quant_bytes(tensors, name)
        assert got == exp, (name, got, exp)
        assert f"{name}.weight" not in tensors  # no float copy of a quantized weight
        m = model.get_submodule(name)
        qbits = storage_bits(tuple(m.weight.shape), m.w_spec)["total"]
        assert abs(sum(got.values()) - qbits / 8) < len(got), (name, sum(got.values()), qbits / 8)
        qbits_report += qbits
        n_packed += len(got)
    # everything else is fp16 (2 bytes a value) and size_report counts 16 bits for it
    float_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                      if k.rsplit(".", 1)[1] not in QSUFFIXES and t.is_floating_point()
                      and not k.endswith(("inv_freq", "original_inv_freq")))
    file_q_bytes = sum(sum(_quant_bytes(tensors, n).values()) for n in expected)
    assert abs(file_q_bytes - qbits_report / 8) < n_packed
    assert abs(file_q_bytes + float_bytes - rep["model_bits"] / 8) < n_packed


# ------------------------------------------------------------------------------------------- (a)
def test_roundtrip_tiny_llama_int4_g32_act_int8(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    cfg = QuantConfig(weight=parse_spec("int4", "g32"), act=parse_spec("int8", "token"))
    quantize_model(model, cfg, progress=False)
    d16 = _roundtrip_checks(model, tmp_path)
    reloaded, _ = load_quantized(d16)
    assert all(m.a_spec == cfg.act for m in quant_modules(reloaded).values())
    exp = {}
    for i in range(2):
        for s, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                         ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                         ("mlp.gate_proj", (72, 64)), ("mlp.up_proj", (72, 64)), ("mlp.down_proj", (64, 72))):
            exp[f"model.layers.{i}.{s}"] = _expected_bytes(shape, "int", 4, 32, sym=False)
    _check_file_bytes(model, d16, exp)
    # ragged down_proj: 72 inputs -> 3 groups per row
    assert exp["model.layers.0.mlp.down_proj"] == {"qweight": 64 * 72 // 2, "scale": 64 * 3 * 2, "zero": 64 * 3 // 2}


# ------------------------------------------------------------------------------------------- (b)
@needs_shared
def test_roundtrip_stories260k_int3_sym_tied_int8_embeddings(tmp_path):
    model, tok = load_model("stories260k")
    cfg = QuantConfig(weight=parse_spec("int3", "g32", symmetric=True), embed=parse_spec("int8", "channel"))
    quantize_model(model, cfg, progress=False)
    assert tied_embeddings(model)
    ids = torch.tensor([tok.encode("Once upon a time, there was a little dog named Max.")])
    d16 = _roundtrip_checks(model, tmp_path, tok=tok, ids=ids)
    tensors = _file_tensors(d16 / "model.safetensors")
    assert not any(k.startswith("lm_head.") for k in tensors)  # one tensor for embedding and head
    meta = json.loads((d16 / "quant_config.json").read_text())
    assert meta["modules"]["lm_head"]["tied_to"] == "model.embed_tokens"

    exp = {"model.embed_tokens": _expected_bytes((512, 64), "int", 8, 64, sym=False)}
    for i in range(5):
        for s, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                         ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                         ("mlp.gate_proj", (172, 64)), ("mlp.up_proj", (172, 64)), ("mlp.down_proj", (64, 172))):
            exp[f"model.layers.{i}.{s}"] = _expected_bytes(shape, "int", 3, 32, sym=True)
    _check_file_bytes(model, d16, exp)

    # load_model dispatches on quant_config.json and finds the copied tokenizer
    m2, tok2 = load_model(d16)
    assert isinstance(tok2, SPTokenizer) and tok2.encode("Once upon") == tok.encode("Once upon")
    assert isinstance(m2.model.embed_tokens, QuantEmbedding) and isinstance(m2.lm_head, QuantLinear)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert torch.equal(m2.lm_head.weight, model.lm_head.weight)
    m32, _ = load_model(tmp_path / "fp32")
    assert torch.equal(_logits(m32, ids), _logits(model, ids))


# ------------------------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("fmt,gran,sym", [("mxfp4", None, True), ("int4", "gguf", False),
                                          ("int5", "gguf", True), ("nf4", "g64", True)])
def test_roundtrip_block_formats(tmp_path, fmt, gran, sym):
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec(fmt, gran, symmetric=sym)), progress=False)
    d16 = _roundtrip_checks(model, tmp_path)
    kind, bits, g = {"mxfp4": ("mx", 4, 32), "int4": ("gguf", 4, 32), "int5": ("gguf", 5, 32),
                     "nf4": ("int", 4, 64)}[fmt]
    exp = {}
    for i in range(2):
        for s, shape in (("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (32, 64)),
                         ("self_attn.v_proj", (32, 64)), ("self_attn.o_proj", (64, 64)),
                         ("mlp.gate_proj", (72, 64)), ("mlp.up_proj", (72, 64)), ("mlp.down_proj", (64, 72))):
            exp[f"model.layers.{i}.{s}"] = _expected_bytes(shape, kind, bits, g, sym=sym)
    _check_file_bytes(model, d16, exp)


def test_roundtrip_activation_only(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(act=parse_spec("int8", "token")), progress=False)
    d16 = _roundtrip_checks(model, tmp_path)
    tensors = _file_tensors(d16 / "model.safetensors")
    assert not any(k.endswith(".qweight") for k in tensors)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    m16, _ = load_quantized(d16)
    assert all(m.w_spec is None and m.a_spec == parse_spec("int8", "token") for m in quant_modules(m16).values())


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "OPTForCausalLM", "Qwen3ForCausalLM"])
def test_roundtrip_other_architectures(tmp_path, arch):
    """Scaled tied embeddings (Gemma2), biases and learned positions (OPT), q/k norms (Qwen3)."""
    model = tiny_model(arch)
    tied = tied_embeddings(model)
    cfg = QuantConfig(weight=parse_spec("int4", "g32"), embed=parse_spec("int8", "channel") if tied else None)
    quantize_model(model, cfg, progress=False)
    d16 = _roundtrip_checks(model, tmp_path)
    m16, _ = load_quantized(d16)
    assert tied_embeddings(m16) == tied
    if tied:
        assert isinstance(m16.get_submodule("lm_head"), QuantLinear)
        assert m16.lm_head.weight is m16.get_submodule(
            "model.decoder.embed_tokens" if arch.startswith("OPT") else "model.embed_tokens").weight


def test_save_live_qat_model(tmp_path):
    """A model still in live (QAT) mode is saved with the grid its forward uses and reloads frozen."""
    from lowbit.qmodules import replace_modules
    from lowbit.quantize import block_linear_filter
    from lowbit.quantizer import fake_quantize

    model = tiny_model("LlamaForCausalLM")
    spec = parse_spec("int4", "g32")
    replace_modules(model, lambda m, n: QuantLinear.from_linear(m, spec), block_linear_filter(model))
    model.lowbit_config = QuantConfig(weight=spec)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    want = _logits(model, ids)
    d = save_quantized(model, tmp_path / "live", tokenizer=toy_tokenizer(), float_dtype=torch.float32)
    m2, _ = load_quantized(d)
    assert torch.equal(_logits(m2, ids), want)
    for n, m in quant_modules(model).items():
        r = m2.get_submodule(n)
        assert r.frozen and not m.frozen
        assert torch.equal(r.weight, fake_quantize(m.weight.detach(), spec))


# ---------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32")), progress=False)
    return save_quantized(model, tmp_path / "q", tokenizer=toy_tokenizer())


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("loader", [load_quantized, lambda p: load_model(p)])
def test_corrupt_safetensors(saved, loader):
    f = saved / "model.safetensors"
    g = torch.Generator().manual_seed(1)
    f.write_bytes(bytes(torch.randint(0, 256, (f.stat().st_size,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(ValueError) as ei:
        loader(saved)
    _one_line(ei, "corrupt")


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError) as ei:
        load_quantized(saved)
    _one_line(ei, "corrupt")


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_wrong_format_version(saved, version):
    qc = saved / "quant_config.json"
    meta = json.loads(qc.read_text())
    meta["format_version"] = version
    qc.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as ei:
        load_model(saved)
    _one_line(ei, "format_version")


def test_invalid_quant_config_json(saved):
    (saved / "quant_config.json").write_text("{not json")
    with pytest.raises(ValueError) as ei:
        load_quantized(saved)
    _one_line(ei)


def test_save_requires_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(tiny_model("LlamaForCausalLM"), tmp_path / "x")


def test_load_model_dispatches_to_load_quantized(saved, monkeypatch):
    import lowbit.export as export

    calls = []
    real = export.load_quantized

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(export, "load_quantized", spy)
    model, tok = load_model(saved)
    assert len(calls) == 1 and isinstance(tok, HFTokenizer) and tok.vocab_size == 128
    mods = quant_modules(model)
    assert len(mods) == 14 and all(isinstance(m, QuantLinear) and m.frozen for m in mods.values())
    assert model.lowbit_config.weight == parse_spec("int4", "g32")
