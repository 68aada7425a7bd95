"""Architecture specs, quantize_model on every supported family, and load_model's inputs and errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import ARCH_NAMES, STORIES, needs_shared, tiny_model, unique_params
from lowbit.config import QuantConfig, parse_spec
from lowbit.models import ARCHS, arch_of, load_model, tied_embeddings
from lowbit.qmodules import QuantEmbedding, QuantLinear
from lowbit.quantize import quantize_model
from lowbit.tokenizer import SPTokenizer

STORIES_PARAMS = 260_032  # models/README.md


def _per_row_int8_asym(w: torch.Tensor) -> torch.Tensor:
    """Hand-written min-max asymmetric 8-bit per-row RTN (fp16 scales), the documented grid."""
    lo = w.min(1, keepdim=True).values.clamp(max=0)
    hi = w.max(1, keepdim=True).values.clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where(s > 0, s, torch.ones_like(s)).clamp(2.0**-24, 65504.0).half().float()
    z = torch.round(-lo / s).clamp(0, 255)
    q = torch.clamp(torch.round(w / s + z), 0, 255)
    return s * (q - z)


def _assert_one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), f"error message should be one line: {msg!r}"
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"
    return msg


def _assert_lists_supported(msg: str) -> None:
    for name in ARCH_NAMES:
        assert name in msg, f"supported architecture {name} missing from {msg!r}"


# ------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_quantize_every_arch_int8_channel(arch):
    model = tiny_model(arch)
    spec = arch_of(model)
    assert spec is ARCHS[arch]
    n_layers = model.config.num_hidden_layers
    blocks = model.get_submodule(spec.layers)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == n_layers

    # the spec must name exactly the Linears a block really has (no missing, no extra)
    for i, block in enumerate(blocks):
        real = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert real == set(spec.linears), (arch, i, real ^ set(spec.linears))
    assert len(set(spec.linears)) == len(spec.linears)
    assert {x for grp in spec.sequential for x in grp} == set(spec.linears)

    ref = copy.deepcopy(model)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    emb0 = model.get_submodule(spec.embed).weight.detach().clone()
    torch.manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref_logits = ref(x).logits

    quantize_model(model, QuantConfig(weight=parse_spec("int8", "channel")), progress=False)

    expected = {f"{spec.layers}.{i}.{lin}" for i in range(n_layers) for lin in spec.linears}
    got = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert got == expected
    assert len(got) == n_layers * len(spec.linears)
    assert not any(isinstance(m, QuantEmbedding) for m in model.modules())
    assert not isinstance(model.get_submodule(spec.head), QuantLinear)
    assert torch.equal(model.get_submodule(spec.embed).weight, emb0)
    for name in expected:
        m = model.get_submodule(name)
        assert m.frozen
        assert torch.equal(m.weight.detach(), _per_row_int8_asym(w0[name])), name

    with torch.no_grad():
        q_logits = model(x).logits
    assert q_logits.shape == ref_logits.shape and torch.isfinite(q_logits).all()
    err = (q_logits - ref_logits).abs().max().item()
    assert 0 < err < 0.05 * ref_logits.abs().max().item(), err

    # still a working causal LM: cached greedy generation equals the uncached argmax
    with torch.no_grad():
        out = model.generate(x[:1, :4], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 8)
        nxt = model(out[:, :-1]).logits[0, 3:].argmax(-1)
    assert torch.equal(nxt, out[0, 4:])


@pytest.mark.parametrize("kind", ["GPT2LMHeadModel", "BertLMHeadModel"])
def test_unsupported_architecture_lists_supported(kind):
    import transformers as tf

    if kind == "GPT2LMHeadModel":
        cfg = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    else:
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=48, max_position_embeddings=32, is_decoder=True)
    cfg.architectures = [kind]
    model = getattr(tf, kind)(cfg)
    with pytest.raises(ValueError) as ei:
        arch_of(model)
    msg = _assert_one_line_error(ei, kind)
    _assert_lists_supported(msg)
    with pytest.raises(ValueError) as ei:
        quantize_model(model, QuantConfig(weight=parse_spec("int8", "channel")), progress=False)
    _assert_lists_supported(str(ei.value))


# ------------------------------------------------------------------------------------ load_model
@needs_shared
def test_load_stories260k_short_name():
    model, tok = load_model("stories260k")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert unique_params(model) == STORIES_PARAMS
    assert tied_embeddings(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.bos_id == 1 and tok.vocab_size == 512
    # README sanity figure: greedy from "Once upon a time" meets Lily
    ids = torch.tensor([tok.encode("Once upon a time")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "Lily" in tok.decode(out[0].tolist())


@needs_shared
def test_load_transformers_folder(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir)
    ref = tiny_model("LlamaForCausalLM")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert isinstance(tok, SPTokenizer) and tok.bos_id == 1


@needs_shared
def test_load_llama2c_bin_matches_hf_folder():
    model, tok = load_model(STORIES / "stories260K.bin")
    assert isinstance(tok, SPTokenizer) and tok.path.name == "tok512.model"
    assert unique_params(model) == STORIES_PARAMS and tied_embeddings(model)
    hf, _ = load_model(STORIES / "hf")
    ids = torch.tensor([tok.encode("Once upon a time there was a cat")])
    with torch.no_grad():
        a, b = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_load_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as ei:
        load_model(tmp_path / "no-such-model")
    _assert_one_line_error(ei, "no-such-model")


def test_load_folder_without_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as ei:
        load_model(d)
    _assert_one_line_error(ei, "config.json")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_load_corrupt_safetensors(tmp_path, damage):
    d = tmp_path / "m"
    tiny_model("LlamaForCausalLM").save_pretrained(d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    if damage == "garbage":
        g = torch.Generator().manual_seed(0)
        f.write_bytes(bytes(torch.randint(0, 256, (len(data),), generator=g, dtype=torch.uint8).tolist()))
    else:
        f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as ei:
        load_model(d)
    _assert_one_line_error(ei, "corrupt")


def test_load_unsupported_architecture_folder(tmp_path):
    d = tmp_path / "m"
    tiny_model("LlamaForCausalLM").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as ei:
        load_model(d)
    msg = _assert_one_line_error(ei, "GPT2LMHeadModel")
    _assert_lists_supported(msg)


@needs_shared
def test_load_llama2c_bin_without_tokenizer(tmp_path):
    import shutil

    shutil.copyfile(STORIES / "stories260K.bin", tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError) as ei:
        load_model(tmp_path / "m.bin")
    _assert_one_line_error(ei, "tokenizer")
    model, tok = load_model(tmp_path / "m.bin", tokenizer=STORIES / "tok512.model")
    assert unique_params(model) == STORIES_PARAMS and tok.vocab_size == 512


def test_load_unsupported_file_type(tmp_path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"not a model")
    with pytest.raises(ValueError) as ei:
        load_model(f)
    _assert_one_line_error(ei, "weights.pt")
