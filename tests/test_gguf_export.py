"""GGUF export: lowbit's codes and scales as ggml blocks, checked with gguf-py's dequantizer (the oracle) and
transformers' GGUF loader (logits and tokenizer); one-line refusals; the requantize opt-in; the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import needs_shared, needs_smollm2

gguf = pytest.importorskip("gguf")
import transformers as tf  # noqa: E402

from lowbit.config import QuantConfig, parse_spec  # noqa: E402
from lowbit.gguf_export import _rope_perm, exact_type, export_gguf  # noqa: E402
from lowbit.quantize import quantize_model  # noqa: E402
from lowbit.quantizer import quantize  # noqa: E402

# module (relative to a block) -> GGUF name
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
TEXT = "Once upon a time, there was a little girl named Lily. She liked to play with her red ball!"


def block_llama(seed: int = 0, vocab: int = 64):
    """A tiny random Llama whose rows are whole k-quant super-blocks (256) and GQA (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return tf.LlamaForCausalLM(cfg).eval()


def read_gguf(path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (ggml type, values dequantized by gguf-py) of every tensor in the file."""
    r = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in r.tensors}


def unpermute(w: np.ndarray, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation."""
    return torch.from_numpy(np.array(w))[torch.argsort(_rope_perm(w.shape[0], n_head))]


def ggml_formula(m) -> torch.Tensor:
    """The value ggml computes from lowbit's own codes and scales, in ggml's order of operations:
    ``d*q + fp16(-d*z)`` (Q4_1/Q5_1), ``(d*sc)*q - dmin*mn`` (asymmetric k-quants)."""
    spec, qp = m.w_spec, m.qparams
    q = quantize(m.weight.detach(), qp, spec).float()
    R, n = q.shape
    if spec.granularity.__class__.__name__ == "PerGroup":
        d = qp.scale.expand(R, n // 32, 32).reshape(R, n)
        mn = (-qp.scale * qp.zero).half().float().expand(R, n // 32, 32).reshape(R, n)
        return d * q + mn
    K = spec.granularity.subs_per_super
    G = qp.scale.shape[1]
    rep = lambda t: t.repeat_interleave(K, 1)[:, :G]  # noqa: E731
    sc = torch.round(qp.scale[..., 0] / rep(qp.super_scale))
    mc = torch.round(qp.zero[..., 0] * qp.scale[..., 0] / rep(qp.super_min))
    per_sub = lambda t: t.repeat_interleave(32, 1)  # noqa: E731
    return per_sub(rep(qp.super_scale) * sc) * q - per_sub(rep(qp.super_min) * mc)


EXACT = [("int8", "g32", True, "Q8_0"), ("int4", "g32", True, "Q4_0"), ("int5", "g32", True, "Q5_0"),
         ("int4", "g32", False, "Q4_1"), ("int5", "g32", False, "Q5_1"), ("int4", "gguf", False, "Q4_K"),
         ("int5", "gguf", False, "Q5_K"), ("int4", "gguf", True, "Q4_K"), ("int5", "gguf", True, "Q5_K"),
         ("int6", "gguf", True, "Q6_K"), ("int6", "gguf256x16s7", True, "Q6_K"),
         ("mxint8", None, True, "Q8_0"), ("int4", "g32-zfloat", False, "Q4_1")]


@pytest.mark.parametrize("fmt,gran,sym,qtype", EXACT, ids=[f"{f}-{g}-{'sym' if s else 'asym'}" for f, g, s, _ in EXACT])
def test_blocks_match_gguf_dequantizer(fmt, gran, sym, qtype, tmp_path):
    # mxint8: power-of-two (e8m0) scales, fp16 values here; zfloat: HQQ's fractional fp16 zero-points
    spec = parse_spec(fmt, gran and gran.split("-")[0], symmetric=sym,
                      zero_point="float" if gran and gran.endswith("zfloat") else "int")
    assert exact_type(spec) == qtype
    model = block_llama()
    with torch.no_grad():  # an all-zero group (e8m0 gives it the scale 2^-127, below fp16)
        model.model.layers[0].mlp.down_proj.weight[:2, 32:64] = 0
    quantize_model(model, QuantConfig(weight=spec, embed=spec, head=spec), progress=False)
    rep = export_gguf(model, None, tmp_path / "m.gguf")
    back = read_gguf(tmp_path / "m.gguf")
    assert rep["bytes"] == (tmp_path / "m.gguf").stat().st_size and rep["lossy"] == {}
    mods = {"token_embd.weight": (model.model.embed_tokens, None), "output.weight": (model.lm_head, None)}
    for i, blk in enumerate(model.model.layers):
        for rel, short in NAMES.items():
            heads = 4 if short == "attn_q" else 2 if short == "attn_k" else None
            mods[f"blk.{i}.{short}.weight"] = (blk.get_submodule(rel), heads)
    for name, (m, heads) in mods.items():
        typ, w = back[name]
        assert typ == qtype, name
        got = unpermute(w, heads) if heads else torch.from_numpy(np.array(w))
        ref = m.weight.detach()  # lowbit's dequantized weight (frozen)
        if sym:  # codes and fp16 scales map one to one: bit-exact
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            continue
        # same codes and scales: ggml's own formula on lowbit's qparams is what gguf-py reads back, bit for bit
        torch.testing.assert_close(got, ggml_formula(m), rtol=0, atol=0)
        if qtype.endswith("_1"):  # m = -d*z stored in fp16: each group moves by at most that rounding
            m32 = -m.qparams.scale * m.qparams.zero
            merr = (m32.half().float() - m32).abs().expand(-1, -1, 32).reshape(ref.shape)
            assert ((got - ref).abs() <= merr + 2**-23 * ref.abs()).all(), name
            assert merr.max() <= 2**-11 * m32.abs().max()
        else:  # k-quants: lowbit keeps the min as zero = min/scale; the values agree to fp32 rounding
            assert (got - ref).abs().max() <= 8 * 2**-24 * ref.abs().max(), name
        assert rep["max_abs_err"][name] == pytest.approx(float((got - ref).abs().max()), abs=1e-12)
    for name in ("blk.0.attn_norm.weight", "blk.1.ffn_norm.weight", "output_norm.weight"):
        assert back[name][0] == "F32"
    if sym:  # transformers' GGUF loader (gguf-py dequantizes) gives the quantized model's logits
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        m2 = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
        assert not m2.config.tie_word_embeddings and m2.config.num_key_value_heads == 2
        with torch.no_grad():
            torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_float_model_and_hyperparameters(tmp_path):
    model = block_llama()
    rep = export_gguf(model, None, tmp_path / "f.gguf", float_type="f32", name="tiny")
    assert set(rep["tensors"].values()) == {"F32"}
    r = gguf.GGUFReader(str(tmp_path / "f.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "llama" and kv["tokenizer.ggml.model"] == "no_vocab"
    assert kv["general.name"] == "tiny" and kv["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.feed_forward_length"],
            kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"], kv["llama.rope.dimension_count"],
            kv["llama.context_length"], kv["llama.vocab_size"]) == (2, 256, 512, 4, 2, 64, 64, 64)
    assert kv["llama.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    m2 = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="f.gguf")
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_unsupported_spec_one_line_error_and_requantize(tmp_path):
    model = block_llama()
    quantize_model(model, QuantConfig(weight=parse_spec("int3", "g128")), progress=False)
    with pytest.raises(ValueError) as e:
        export_gguf(model, None, tmp_path / "x.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.0.self_attn.q_proj (int3 g128 asym)" in msg
    assert "--w-granularity g32" in msg and "requantize='q8_0'" in msg
    assert not (tmp_path / "x.gguf").exists()
    rep = export_gguf(model, None, tmp_path / "x.gguf", requantize="q8_0")
    blocks = [n for n in rep["tensors"] if n.startswith("blk.") and "norm" not in n]
    assert len(blocks) == 14 and all(rep["tensors"][n] == "Q8_0" for n in blocks)
    assert set(rep["lossy"]) == set(blocks) and all("int3 g128 asym" in v for v in rep["lossy"].values())
    assert 0 < max(rep["max_abs_err"][n] for n in blocks) < 0.01
    # f32 stores the dequantized weights: exact, and nothing is lossy
    rep = export_gguf(model, None, tmp_path / "y.gguf", requantize="f32")
    assert rep["lossy"] == {} and max(rep["max_abs_err"].values()) == 0.0


def test_refusals(tmp_path):
    model = block_llama()
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32"), act=parse_spec("int8", "token", symmetric=True)),
                   progress=False)
    with pytest.raises(ValueError, match="activation quantization"):
        export_gguf(model, None, tmp_path / "a.gguf", requantize="q8_0")
    from conftest import tiny_model

    with pytest.raises(ValueError, match="supports LlamaForCausalLM and MistralForCausalLM.*not Qwen2ForCausalLM"):
        export_gguf(tiny_model("Qwen2ForCausalLM"), None, tmp_path / "q.gguf")
    swa = tiny_model("MistralForCausalLM")
    swa.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding-window"):
        export_gguf(swa, None, tmp_path / "w.gguf")
    ragged = tiny_model("LlamaForCausalLM")  # FFN width 72: down_proj rows are not whole blocks
    quantize_model(ragged, QuantConfig(weight=parse_spec("int8", "g32", symmetric=True)), progress=False)
    with pytest.raises(ValueError, match=r"mlp.down_proj \(int8 g32 sym\): rows of 72 .*--skip mlp.down_proj"):
        export_gguf(ragged, None, tmp_path / "r.gguf")
    rep = export_gguf(ragged, None, tmp_path / "r.gguf", requantize="q8_0")  # ragged rows fall back to float
    assert rep["tensors"]["blk.0.ffn_down.weight"] == "F16" and "not whole" in rep["lossy"]["blk.0.ffn_down.weight"]
    with pytest.raises(ValueError, match="requantize must be one of"):
        export_gguf(ragged, None, tmp_path / "r.gguf", requantize="q2_k")


def test_bpe_tokenizer_metadata_roundtrip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lowbit.tokenizer import HFTokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT, "The sun was warm; 42 birds sang in the park."] * 10,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<pad>")
    tok = HFTokenizer(fast, "toy-bpe")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    rep = export_gguf(tf.LlamaForCausalLM(cfg).eval(), tok, tmp_path / "b.gguf")
    assert rep["tokenizer"] == "gpt2 from toy-bpe"
    r = gguf.GGUFReader(str(tmp_path / "b.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.ggml.")}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == 320 and kv["tokenizer.ggml.tokens"][310] == "[PAD310]"  # padded
    assert kv["tokenizer.ggml.token_type"][0] == 3 and kv["tokenizer.ggml.bos_token_id"] == 0
    t2 = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="b.gguf")
    for text in (TEXT, "The sun: 42 warm birds! <|endoftext|> ok"):
        assert t2(text)["input_ids"] == tok.encode(text)


def test_unconvertible_tokenizer_says_source_gguf(tmp_path):
    from test_export import toy_tokenizer  # a WordLevel tokenizer

    model = block_llama(vocab=128)
    with pytest.raises(ValueError, match="source_gguf"):
        export_gguf(model, toy_tokenizer(), tmp_path / "t.gguf")


@needs_shared
def test_stories260k_logits_and_tokenizer_through_transformers(tmp_path):
    from lowbit.models import load_model

    model, tok = load_model("stories260k")
    # int8 g32 weights, int4 sym g32 tied embedding; down_proj's rows (172) are not whole blocks: stored
    # dequantized in f32, so the whole file is exact
    quantize_model(model, QuantConfig(weight=parse_spec("int8", "g32", symmetric=True),
                                      embed=parse_spec("int4", "g32", symmetric=True)), progress=False)
    rep = export_gguf(model, tok, tmp_path / "s.gguf", requantize="f32")
    assert rep["tensors"]["token_embd.weight"] == "Q4_0" and "output.weight" not in rep["tensors"]
    assert rep["tensors"]["blk.0.attn_q.weight"] == "Q8_0" and rep["tensors"]["blk.4.ffn_down.weight"] == "F32"
    assert rep["lossy"] == {} and max(rep["max_abs_err"].values()) == 0.0
    assert rep["tokenizer"].startswith("llama from sentencepiece")
    m2 = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    assert m2.config.tie_word_embeddings and m2.config.head_dim == 8 and m2.config.num_key_value_heads == 4
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    t2 = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="s.gguf")
    for text in (TEXT, "The dog said: \"Hi, Tom!\"\nThey were happy."):
        assert t2(text)["input_ids"] == tok.encode(text)


@pytest.mark.slow
@needs_smollm2
@needs_shared
def test_smollm2_two_layers_copies_source_tokenizer(tmp_path):
    from lowbit.models import load_model, smollm2_gguf

    model, tok = load_model("smollm2-135m")
    model.model.layers = model.model.layers[:2]  # two blocks are enough; keeps the test short
    model.config.num_hidden_layers = 2
    quantize_model(model, QuantConfig(weight=parse_spec("int4", "g32", symmetric=True),
                                      embed=parse_spec("int8", "g32", symmetric=True)), progress=False)
    rep = export_gguf(model, tok, tmp_path / "sm.gguf")
    assert rep["tokenizer"] == f"copied from {smollm2_gguf()}"
    assert gguf.GGUFReader(str(tmp_path / "sm.gguf")).fields["general.name"].contents() == \
        gguf.GGUFReader(str(smollm2_gguf())).fields["general.name"].contents()
    assert rep["tensors"]["token_embd.weight"] == "Q8_0" and rep["tensors"]["blk.1.ffn_down.weight"] == "Q4_0"
    src, out = gguf.GGUFReader(str(smollm2_gguf())), gguf.GGUFReader(str(tmp_path / "sm.gguf"))
    for k, f in src.fields.items():
        if k.startswith("tokenizer."):
            assert out.fields[k].contents() == f.contents(), k
    m2 = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="sm.gguf")
    text = "The capital of France is Paris. It has 2 million people!"
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    t2 = tf.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sm.gguf")
    assert t2(text)["input_ids"] == tok.encode(text)


@needs_smollm2
def test_saved_folder_finds_its_source_gguf(tmp_path):
    from lowbit.cli import _base_gguf
    from lowbit.models import smollm2_gguf

    (tmp_path / "quant_config.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert _base_gguf(str(tmp_path)) == smollm2_gguf()
    (tmp_path / "quant_config.json").write_text(json.dumps({"base_model": "stories260k"}))
    assert _base_gguf(str(tmp_path)) is None


@needs_shared
def test_cli_quantize_gguf_and_export_gguf(tmp_path, capsys):
    from test_cli import assert_one_line_error, run

    out, g1, g2 = tmp_path / "w4", tmp_path / "q.gguf", tmp_path / "e.gguf"
    code, stdout, err = run(["quantize", "stories260k", "--w-format", "int4", "--w-sym", "--w-granularity", "g32",
                             "--skip", "mlp.down_proj", "--out", str(out), "--gguf", str(g1)], capsys)
    assert code == 0, err
    assert f"wrote {g1}" in stdout and "30 Q4_0" in stdout
    code, stdout, err = run(["export-gguf", str(out), str(g2), "--float-type", "f32", "--json",
                             str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["tensors"]["blk.0.attn_k.weight"] == "Q4_0" and rep["tensors"]["blk.0.ffn_down.weight"] == "F32"
    names = [{k: f.contents() for k, f in gguf.GGUFReader(str(g)).fields.items()}["general.name"] for g in (g1, g2)]
    assert names == ["stories260k", "w4"]
    back1, back2 = read_gguf(g1), read_gguf(g2)
    np.testing.assert_array_equal(back1["blk.3.attn_q.weight"][1], back2["blk.3.attn_q.weight"][1])
    assert back1["blk.0.ffn_down.weight"][0] == "F16"
    # the GGUF runs in transformers: same logits as the saved lowbit folder (down_proj: f32 here)
    from lowbit.models import load_model

    model, tok = load_model(str(out))
    m2 = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="e.gguf")
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-4)

    # refused before quantizing, in one line
    code, _, err = run(["quantize", "stories260k", "--w-format", "int3", "--w-granularity", "g32",
                        "--gguf", str(tmp_path / "x.gguf")], capsys)
    assert_one_line_error(code, err, "int3 g32 asym", "no exact GGUF block type", "--requantize q8_0")
    code, _, err = run(["quantize", "stories260k", "--w-format", "int4", "--w-granularity", "g32",
                        "--gguf", str(tmp_path / "x.gguf")], capsys)
    assert_one_line_error(code, err, "mlp.down_proj", "rows of 172", "--skip mlp.down_proj")
    code, _, err = run(["export-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")], capsys)
    assert_one_line_error(code, err, "model not found")
    assert not (tmp_path / "x.gguf").exists()
