"""Export a lowbit-quantized Llama-family model to a GGUF file that llama.cpp loads.

lowbit's own integer codes and scales are written as raw ggml blocks (no re-quantization) when a
weight's spec is one of llama.cpp's block types (``QK = 32`` values per block, ``QK_K = 256`` per
super-block)::

    int8 sym g32                  Q8_0         d fp16, 32 int8 (q - 128)                          exact
    int4 / int5 sym g32           Q4_0 / Q5_0  d fp16, codes q, value d (q - 2^(b-1))             exact
    int4 / int5 asym g32          Q4_1 / Q5_1  d fp16, value d q + m with m = -d z in fp16        m is rounded to fp16
    int4 / int5 sym gguf          Q4_K / Q5_K  dmin = 2^(b-1) d, sub-mins = sub-scales            exact
    int4 / int5 asym gguf         Q4_K / Q5_K  d, dmin fp16, 6-bit sub-scales and sub-mins        same codes and scales;
                                               values agree to fp32 rounding (lowbit keeps zero = min / scale)
    int6 sym gguf, gguf256x16s7   Q6_K         int8 sub-scales per 16 (a 32-run repeats its own)  exact

(``gguf`` = ``gguf256x32s6``; ``sym`` groups may also have power-of-two e8m0 scales when those are fp16
values, e.g. ``mxint8`` -> Q8_0.) A block type needs rows that are a whole number of blocks. Anything
else (other widths or group sizes, per-channel, table formats, BCQ, SpQR outliers, mixed precision) is
refused with a one-line error, unless ``requantize`` names a type to which the weight the lowbit model
computes with is re-quantized by ``gguf.quants`` (lossy, listed in the report) or stored dequantized
(``"f32"``: exact, uncompressed). Activation or KV-cache quantization and QuaRot's online rotations change
the forward pass itself and are always refused.

Tensors follow llama.cpp's ``llama`` names; the rows of ``attn_q`` / ``attn_k`` are permuted as llama.cpp's
converter does for its rotary layout (a row permutation: whole blocks move, so it stays exact). Norms are
f32, other float tensors ``float_type``; tied embeddings are written once as ``token_embd``. Tokenizer
metadata is copied from the GGUF the model came from, or built from a byte-level BPE ``tokenizer.json``
or a sentencepiece model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .formats import IntFormat
from .granularity import GGUFBlock, PerGroup
from .quantizer import QuantSpec, compute_qparams, dequantize, quantize

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
REQUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "f32")
EXPORTABLE = ("int8 sym g32 (Q8_0), int4/int5 sym or asym g32 (Q4_0/Q5_0, Q4_1/Q5_1), int4/int5 gguf (Q4_K/Q5_K), "
              "int6 sym gguf (Q6_K)")
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf():
    import gguf

    return gguf


# ------------------------------------------------------------------------------------ block layouts
def _f16(x: np.ndarray) -> np.ndarray:
    """(B,) or (B, k) values -> their fp16 bytes, (B, 2k) uint8."""
    return np.ascontiguousarray(x, dtype=np.float16).view(np.uint8).reshape(x.shape[0], -1)


def _nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """Two 4-bit values per byte: in every run of ``2 * width`` values, byte ``j`` holds value ``j`` in its low
    nibble and value ``width + j`` in its high nibble (the qs layout of Q4_0/Q4_1/Q5_*: width 16, Q4_K/Q5_K: 32,
    Q6_K's low bits: 64)."""
    r = q.reshape(q.shape[0], -1, 2, width)
    return ((r[:, :, 0] & 15) | ((r[:, :, 1] & 15) << 4)).reshape(q.shape[0], -1).astype(np.uint8)


def _bit_planes(b: np.ndarray, planes: int, bits: int) -> np.ndarray:
    """``b`` (B, planes * W) small values of ``bits`` bits -> (B, W) bytes: plane ``p``'s value ``j`` sits at bit
    ``p * bits`` of byte ``j`` (Q5_K's 5th bits: 8 planes of 32 x 1 bit; Q6_K's top bits: 4 planes x 2 bits)."""
    r = b.reshape(b.shape[0], planes, -1).astype(np.uint8)
    out = np.zeros((b.shape[0], r.shape[2]), np.uint8)
    for p in range(planes):
        out |= r[:, p] << (p * bits)
    return out


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes for 8 six-bit sub-scales and sub-mins: bytes 0-3 hold sc[0..3] with the top
    two bits of sc[4..7] in bits 6-7, bytes 4-7 the same for the mins, bytes 8-11 the low nibbles of sc[4..7]
    (low) and mn[4..7] (high)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)


def _blocks(qtype: str, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None, sc: np.ndarray | None = None,
            mn: np.ndarray | None = None) -> np.ndarray:
    """Bytes of ``B`` blocks. ``q`` (B, 32 or 256) unsigned codes as ggml reads them; ``d`` (and ``m``) one fp16
    value per block; k-quants: ``sc``/``mn`` sub-block scale/min codes (B, 8) or Q6_K's (B, 16)."""
    if qtype == "Q8_0":  # d, 32 x int8
        return np.concatenate([_f16(d), (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    if qtype in ("Q4_0", "Q4_1"):  # d, [m], 16 bytes of nibbles
        return np.concatenate([_f16(d), *([_f16(m)] if qtype == "Q4_1" else []), _nibbles(q, 16)], axis=1)
    if qtype in ("Q5_0", "Q5_1"):  # d, [m], qh = the 5th bits as one little-endian uint32, 16 bytes of nibbles
        qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
        return np.concatenate([_f16(d), *([_f16(m)] if qtype == "Q5_1" else []), qh, _nibbles(q, 16)], axis=1)
    if qtype == "Q4_K":  # d, dmin, 12 scale bytes, 128 bytes of nibbles
        return np.concatenate([_f16(d), _f16(m), _k_scales(sc, mn), _nibbles(q, 32)], axis=1)
    if qtype == "Q5_K":  # d, dmin, 12 scale bytes, 32 bytes of 5th bits, 128 bytes of nibbles
        return np.concatenate([_f16(d), _f16(m), _k_scales(sc, mn), _bit_planes((q >> 4) & 1, 8, 1),
                               _nibbles(q, 32)], axis=1)
    if qtype == "Q6_K":  # 128 bytes of low nibbles, 64 of top 2-bit pairs (per 128-value half), 16 int8 scales, d
        hi = np.concatenate([_bit_planes(h, 4, 2) for h in np.split((q >> 4) & 3, 2, axis=1)], axis=1)
        return np.concatenate([_nibbles(q, 64), hi, sc.astype(np.int8).view(np.uint8), _f16(d)], axis=1)
    raise ValueError(qtype)


def exact_type(spec: QuantSpec) -> str | None:
    """The ggml block type that stores ``spec``'s codes and scales as they are, or None."""
    f, g, sym = spec.fmt, spec.granularity, spec.symmetric
    if not isinstance(f, IntFormat) or not spec.is_uniform:
        return None
    if isinstance(g, PerGroup) and g.size == 32:
        return ({8: "Q8_0", 4: "Q4_0", 5: "Q5_0"} if sym else {4: "Q4_1", 5: "Q5_1"}).get(f.bits)
    if isinstance(g, GGUFBlock) and g.super_block == 256:
        if g.sub_block == 32 and g.scale_bits <= 6 and f.bits in (4, 5):
            return f"Q{f.bits}_K"
        if g.sub_block in (16, 32) and g.scale_bits <= 7 and sym and f.bits == 6:
            return "Q6_K"
    return None


def _spec_problem(spec: QuantSpec, n: int) -> str | None:
    """Why rows of ``n`` values quantized with ``spec`` cannot be written as ggml blocks (None: they can)."""
    qtype = exact_type(spec)
    if qtype is None:
        return "no exact GGUF block type"
    block = 256 if qtype.endswith("K") else 32
    return None if n % block == 0 else f"rows of {n} are not whole {block}-value blocks"


def _rel(name: str, layers: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj`` (the name --skip takes)."""
    return name[len(layers) + 1:].split(".", 1)[-1] if name.startswith(layers + ".") else name


def _refusal(what: str, rel: str, qtype: str | None, why: str) -> ValueError:
    if qtype:  # the right spec, but ggml blocks cannot cover the row
        return ValueError(f"{what}: {why}; keep it in float (--skip {rel}) or opt in to requantize='f32' "
                          "(--requantize f32: stored dequantized, exact but uncompressed)")
    return ValueError(f"{what}: {why}; GGUF export takes {EXPORTABLE}, e.g. --w-format int4 --w-granularity g32 "
                      "or gguf, or opt in to requantize='q8_0' (--requantize q8_0, lossy)")


def _fp16_exact(t: Tensor, what: str) -> np.ndarray:
    a = t.detach().float().cpu()
    if not torch.equal(a.half().float(), a):
        raise ValueError(f"{what}: its scales are not all fp16 values (e8m0 exponents outside fp16's range); "
                         "requantize it instead")
    return a.numpy()


def encode_exact(codes: Tensor, qp, spec: QuantSpec, qtype: str, what: str = "tensor") -> np.ndarray:
    """Rows of ggml blocks (R, bytes per row) for lowbit codes (R, n) with their qparams."""
    R, n = codes.shape
    q = codes.cpu().numpy().astype(np.uint8)
    if not qtype.endswith("K"):  # Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: one scale (and min) per 32
        scale = qp.scale.float().cpu()
        if spec.symmetric:  # an all-zero group's scale is arbitrary (e8m0 gives it 2^-127): write 0
            scale = torch.where((codes.view(R, -1, 32).cpu() == 2 ** (spec.bits - 1)).all(-1, keepdim=True), 0.0, scale)
        d = _fp16_exact(scale, what).reshape(-1)
        m = None
        if qtype.endswith("_1"):  # value = d*q + m, m = -d*z rounded to fp16 (the one inexact step)
            m = (-qp.scale * qp.zero).float().cpu().numpy().reshape(-1)
        blocks = _blocks(qtype, q.reshape(-1, 32), d, m)
    else:
        K = spec.granularity.subs_per_super
        G = qp.scale.shape[1]
        rep = lambda t: t.repeat_interleave(K, 1)[:, :G]  # noqa: E731  per super-block -> per sub-block
        d = qp.super_scale.float().cpu()
        sc_t = torch.round(qp.scale[..., 0].float().cpu() / rep(d))
        if spec.symmetric and qtype != "Q6_K":  # d*sc*(q - z) = d*sc*q - (z*d)*sc: the mins are the scales
            z = 2 ** (spec.bits - 1)
            dmin, mn_t = d * z, sc_t
            if not torch.isfinite(dmin.half().float()).all():
                raise ValueError(f"{what}: a super-block scale times {z} overflows fp16; requantize it instead")
        elif qtype != "Q6_K":
            dmin = qp.super_min.float().cpu()
            mn_t = torch.round(qp.zero[..., 0].float().cpu() * qp.scale[..., 0].float().cpu() / rep(dmin))
        if qtype == "Q6_K":
            if spec.granularity.sub_block == 32:  # each 32-run is two 16-value sub-blocks with the same scale
                sc_t = sc_t.repeat_interleave(2, 1)
            blocks = _blocks(qtype, q.reshape(-1, 256), d.numpy().reshape(-1), sc=sc_t.numpy().reshape(-1, 16))
        else:
            blocks = _blocks(qtype, q.reshape(-1, 256), d.numpy().reshape(-1), dmin.numpy().reshape(-1),
                             sc_t.numpy().reshape(-1, 8), mn_t.numpy().reshape(-1, 8))
    return blocks.reshape(R, -1)


# --------------------------------------------------------------------------------------- tokenizers
def _copy_fields(w, src: Path, prefixes: tuple[str, ...], skip: set[str]) -> list[str]:
    gguf = _gguf()
    r = gguf.GGUFReader(str(src))
    done = []
    for key, f in r.fields.items():
        if not key.startswith(prefixes) or key in skip or not f.types:
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            if len(f.types) != 2 or not f.data:  # nested or empty arrays: nothing a tokenizer needs
                continue
            val = f.contents()
            w.add_key_value(key, val, vt, sub_type=f.types[1])
        else:
            w.add_key_value(key, f.contents(), vt)
        done.append(key)
    return done


def _sentencepiece_vocab(tok) -> dict[str, Any]:
    gguf = _gguf()
    sp = tok.sp
    n = sp.get_piece_size()
    T = gguf.TokenType
    types = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED if sp.is_unused(i)
             else T.BYTE if sp.is_byte(i) else T.NORMAL for i in range(n)]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [float(sp.get_score(i)) for i in range(n)], "types": [int(t) for t in types],
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id(),
            "add_bos": True, "add_eos": False,
            # sentencepiece's dummy prefix: "a" encodes as "\u2581a"
            "add_space_prefix": sp.encode("a", out_type=str)[:1] == ["\u2581a"]}


def _byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_byte_level(v) for v in node.values())
    return isinstance(node, list) and any(_byte_level(v) for v in node)


def _bpe_pre(pre: dict | None) -> str:
    """llama.cpp's name of a known byte-level pre-tokenizer, else "default"."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        kinds = [(p.get("type"), p.get("individual_digits")) for p in pre.get("pretokenizers", [])]
        if kinds == [("Digits", True), ("ByteLevel", None)]:
            return "smollm"
    return "default"


def _hf_bpe_vocab(tok) -> dict[str, Any]:
    gguf = _gguf()
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")) or not model.get("merges"):
        raise ValueError(f"cannot write tokenizer {type(tok).__name__} ({model.get('type', 'no tokenizer.json')}) "
                         "as GGUF metadata (byte-level BPE and sentencepiece are supported); pass source_gguf= "
                         "(--source-gguf) a GGUF of the same model to copy it from")
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(gguf.TokenType.UNUSED)] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(gguf.TokenType.NORMAL)
    for i, at in tok.added_tokens_decoder.items():
        types[i] = int(gguf.TokenType.CONTROL if at.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    return {"model": "gpt2", "pre": _bpe_pre(spec.get("pre_tokenizer")), "tokens": tokens, "types": types,
            "merges": merges, "bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id,
            "pad": tok.pad_token_id, "add_bos": tok.bos_token_id is not None and full[:1] == [tok.bos_token_id]
            and plain[:1] != [tok.bos_token_id], "add_eos": len(full) > len(plain) and full[-1] == tok.eos_token_id,
            "chat_template": tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None}


def _write_vocab(w, v: dict[str, Any], n_vocab: int) -> None:
    gguf = _gguf()
    tokens, types = list(v["tokens"]), list(v["types"])
    scores = list(v.get("scores") or [])
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {n_vocab}")
    for i in range(len(tokens), n_vocab):  # llama.cpp wants one token per embedding row
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        scores += [-1000.0] if scores else []
    w.add_tokenizer_model(v["model"])
    if v.get("pre"):
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores:
        w.add_token_scores(scores)
    if v.get("merges"):
        w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if v.get(key) is not None and v[key] >= 0:
            add(int(v[key]))
    w.add_add_bos_token(bool(v["add_bos"]))
    w.add_add_eos_token(bool(v["add_eos"]))
    if "add_space_prefix" in v:
        w.add_add_space_prefix(bool(v["add_space_prefix"]))
    if v.get("chat_template"):
        w.add_chat_template(v["chat_template"])


def find_source_gguf(model: nn.Module, tokenizer) -> Path | None:
    """The GGUF file ``model`` was loaded from, if lowbit knows it (its tokenizer's or config's name)."""
    for cand in (getattr(tokenizer, "name", None), getattr(model.config, "_name_or_path", None)):
        if cand and str(cand).endswith(".gguf") and Path(cand).is_file():
            return Path(cand)
    return None


# ------------------------------------------------------------------------------------------ export
def _rope_perm(rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp's converter gives q/k: ``w.reshape(n_head, 2, rows // n_head // 2, cols)
    .swapaxes(1, 2)`` -- new row ``i`` is old row ``perm[i]``."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _check_arch(model: nn.Module) -> None:
    archs = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if archs[0] not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF export supports {' and '.join(SUPPORTED_ARCHS)} (llama.cpp's 'llama'), "
                         f"not {archs[0]}")
    window = getattr(model.config, "sliding_window", None)
    if window and window < model.config.max_position_embeddings:
        raise ValueError(f"GGUF export: sliding-window attention (window {window}) has no equivalent in llama.cpp's "
                         "'llama' architecture")
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"GGUF export writes plain RoPE; this model uses rope_type {rope.get('rope_type')!r}")


def check_exportable(model: nn.Module, cfg) -> None:
    """Before quantizing (``lowbit quantize --gguf``): raise the export's one-line error now if
    ``quantize_model(model, cfg)`` would give a model :func:`export_gguf` refuses without ``requantize``."""
    from .models import arch_of
    from .quantize import block_linear_filter, recipe_steps

    _check_arch(model)
    if cfg.act is not None or cfg.kv is not None:
        raise ValueError(f"{'activation' if cfg.act is not None else 'KV-cache'} quantization cannot be expressed in a "
                         "GGUF file; quantize weights only to export")
    steps = set(recipe_steps(cfg.method))
    if "quarot" in steps:
        raise ValueError(f"--method {cfg.method}: QuaRot's online rotations cannot be expressed in a GGUF file")
    for step, what in (("spqr", "SpQR's outliers"), ("mixed", "per-row mixed precision")):
        if step in steps:
            raise ValueError(f"--method {cfg.method}: {what} cannot be written as GGUF blocks; quantize with --out, "
                             "then lowbit export-gguf --requantize q8_0 (lossy)")
    arch = arch_of(model)
    filt = block_linear_filter(model, cfg.skip)
    todo = [(n, cfg.weight, m.in_features) for n, m in model.named_modules() if cfg.weight is not None and filt(m, n)]
    todo += [(arch.embed, cfg.embed, model.config.hidden_size), (arch.head, cfg.head, model.config.hidden_size)]
    for name, spec, n in todo:
        if spec is not None and (why := _spec_problem(spec, n)):
            raise _refusal(f"{name} ({spec.describe()})", _rel(name, arch.layers), exact_type(spec), why)


def _module_problem(m: nn.Module) -> str | None:
    """Why a module's forward is not a plain matmul/lookup with its weight (None if it is)."""
    if getattr(m, "a_spec", None) is not None:
        return "activation quantization"
    if getattr(m, "out_spec", None) is not None:
        return "KV-cache quantization"
    if getattr(m, "in_rot", None) is not None:
        return "an online input rotation (QuaRot)"
    if getattr(m, "learner", None) is not None and not getattr(m, "frozen", True):
        return "a learnable quantizer that is not frozen yet"
    return None


def export_gguf(model: nn.Module, tokenizer, path: str | Path, *, source_gguf: str | Path | None = None,
                float_type: str = "f16", requantize: str | None = None, name: str | None = None,
                verify: bool = True) -> dict:
    """Write ``model`` (a Llama/Mistral, quantized by lowbit or not) and its tokenizer to the GGUF file ``path``.

    Returns ``{"path", "bytes", "tensors": {gguf name: ggml type}, "max_abs_err": {name: largest difference
    to lowbit's dequantized weight}, "lossy": {name: why}, "tokenizer": where its metadata came from}``.
    ``requantize`` (one of ``REQUANT_TYPES``) is the opt-in for weights without an exact block type;
    ``tokenizer=None`` writes no vocabulary (llama.cpp's ``no_vocab``). ``name`` is ``general.name`` (default: the
    source GGUF's, else the model's folder name). ``verify`` dequantizes every block tensor with ``gguf.quants``
    and checks it against lowbit's values.
    """
    gguf = _gguf()
    from .models import arch_of, get_module, head_dim, tied_embeddings

    _check_arch(model)
    if float_type not in ("f16", "f32"):
        raise ValueError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    if requantize is not None and requantize.lower() not in REQUANT_TYPES:
        raise ValueError(f"requantize must be one of {', '.join(REQUANT_TYPES)}, got {requantize!r}")
    requantize = requantize.lower() if requantize else None
    cfg = model.config
    arch = arch_of(model)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = head_dim(model)
    path = Path(path)
    report: dict[str, Any] = {"path": str(path), "tensors": {}, "max_abs_err": {}, "lossy": {}}
    written: set[int] = set()
    tensors: list[tuple[str, np.ndarray, Any]] = []

    def add_float(tname: str, t: Tensor, ftype: str) -> None:
        a = t.detach().float().cpu().numpy()
        if ftype == "f16":
            if not np.isfinite(a.astype(np.float16)).all():
                raise ValueError(f"{tname} has values beyond fp16's range; export with float_type='f32'")
            a = a.astype(np.float16)
        tensors.append((tname, np.ascontiguousarray(a), None))
        report["tensors"][tname] = ftype.upper()

    def add_weight(tname: str, m: nn.Module, perm_heads: int | None) -> None:
        w = m.weight
        written.add(id(w))
        perm = _rope_perm(w.shape[0], perm_heads) if perm_heads else None
        bias = getattr(m, "bias", None)
        if bias is not None:
            written.add(id(bias))
            add_float(tname.replace(".weight", ".bias"), bias if perm is None else bias[perm], "f32")
        problem = _module_problem(m)
        if problem:
            raise ValueError(f"{mod_name[id(m)]} uses {problem}, which a GGUF file cannot express; quantize "
                             "weights only to export")
        spec = getattr(m, "w_spec", None)
        if spec is None:  # a float weight
            add_float(tname, w if perm is None else w[perm], float_type)
            return
        qtype = exact_type(spec)
        why = ("per-row mixed precision" if getattr(m, "w_bits", None) is not None else "SpQR outliers"
               if getattr(m, "w_outlier_idx", None) is not None else _spec_problem(spec, w.shape[1]))
        what = f"{mod_name[id(m)]} ({spec.describe()})"
        if why is None:
            wf = w.detach().float().cpu()
            qp = m.qparams.to("cpu") if m.qparams is not None else compute_qparams(wf, spec)
            codes = quantize(wf, qp, spec)
            rows = encode_exact(codes, qp, spec, qtype, what)
            ref = dequantize(codes, qp, spec)
            tag = qtype
        elif requantize is None:
            raise _refusal(what, _rel(mod_name[id(m)], arch.layers), qtype, why)
        else:
            ref = m.quantized_weight().detach().float().cpu()
            rq = requantize.upper()
            if rq[0] == "Q" and w.shape[1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[rq]][0]:
                why += "" if why.startswith("rows") else f" and rows of {w.shape[1]} are not whole {rq} blocks"
                rq = float_type.upper()  # gguf.quants needs whole blocks: store this one dequantized
            if rq in ("F16", "F32"):
                rows = ref.numpy().astype(np.float16 if rq == "F16" else np.float32)
            else:
                rows = gguf.quants.quantize(ref.numpy(), gguf.GGMLQuantizationType[rq])
            tag = rq
            if rq != "F32":
                report["lossy"][tname] = f"{why}: {spec.describe()} re-stored as {rq}"
        if perm is not None:
            rows, ref = rows[perm.numpy()], ref[perm]
        if verify:
            back = rows.astype(np.float32) if tag[0] == "F" else gguf.quants.dequantize(
                rows, gguf.GGMLQuantizationType[tag])
            e = float(np.abs(back - ref.numpy()).max(initial=0.0))
            report["max_abs_err"][tname] = e
            if why is None and spec.symmetric and e != 0.0:  # symmetric specs map bit for bit
                raise RuntimeError(f"{what}: the {tag} blocks do not reproduce lowbit's values (max error {e:g}); "
                                   "this is a lowbit bug")
        tensors.append((tname, np.ascontiguousarray(rows), None if tag[0] == "F" else gguf.GGMLQuantizationType[tag]))
        report["tensors"][tname] = tag

    mod_name = {id(m): n for n, m in model.named_modules()}
    TN, MT = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    embed, head = get_module(model, arch.embed), get_module(model, arch.head)
    tied = tied_embeddings(model)
    # a tied pair is written once; take the quantized side if only the head was wrapped
    src = head if tied and getattr(embed, "w_spec", None) is None and getattr(head, "w_spec", None) else embed
    add_weight(TN[MT.TOKEN_EMBD] + ".weight", src, None)
    layers = get_module(model, arch.layers)
    for i, blk in enumerate(layers):
        for rel, short in _BLOCK_NAMES.items():
            m = get_module(blk, rel)
            tname = f"blk.{i}.{short}.weight"
            if short.endswith("norm"):
                written.add(id(m.weight))
                add_float(tname, m.weight, "f32")
            else:
                add_weight(tname, m, n_head if short == "attn_q" else n_kv if short == "attn_k" else None)
    norm = get_module(model, arch.final_norm)
    written.add(id(norm.weight))
    add_float(TN[MT.OUTPUT_NORM] + ".weight", norm.weight, "f32")
    if not tied:
        add_weight(TN[MT.OUTPUT] + ".weight", head, None)
    left = [n for n, p in model.named_parameters() if id(p) not in written]
    if left:
        raise ValueError(f"GGUF export has no llama.cpp name for parameter {left[0]}")

    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:  # written to PATH.tmp, renamed when complete
        copied = []
        if tokenizer is not None and source_gguf is None:
            source_gguf = find_source_gguf(model, tokenizer)
        if source_gguf is not None:
            copied = _copy_fields(w, Path(source_gguf), ("tokenizer.", "general."),
                                  {"general.architecture", "general.file_type", "general.quantization_version",
                                   "general.alignment", "general.quantized_by", *(["general.name"] if name else [])})
            report["tokenizer"] = f"copied from {source_gguf}"
        elif tokenizer is None:
            w.add_tokenizer_model("no_vocab")
            report["tokenizer"] = "none (no_vocab)"
        else:
            from .tokenizer import SPTokenizer

            if isinstance(tokenizer, SPTokenizer):
                v = _sentencepiece_vocab(tokenizer)
            else:
                v = _hf_bpe_vocab(getattr(tokenizer, "tok", tokenizer))
            _write_vocab(w, v, cfg.vocab_size)
            report["tokenizer"] = f"{v['model']} from {getattr(tokenizer, 'name', type(tokenizer).__name__)}"
        if name or "general.name" not in copied:
            w.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name or "model")
        w.add_quantized_by("lowbit")
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(len(layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        rope = getattr(cfg, "rope_parameters", None) or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_rope_dimension_count(int(hd))
        if hd * n_head != cfg.hidden_size:
            w.add_key_length(int(hd))
            w.add_value_length(int(hd))
        w.add_file_type(int(_file_type(report["tensors"], tensors)))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, arr, raw in tensors:
            w.add_tensor(tname, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    report["bytes"] = path.stat().st_size
    return report


def _file_type(types: dict[str, str], tensors: list) -> int:
    """general.file_type: the type holding the most weight values (display only)."""
    gguf = _gguf()
    LFT = gguf.LlamaFileType
    size: dict[str, int] = {}
    for tname, arr, raw in tensors:
        if arr.ndim == 2:  # values per row: bytes / type size * block size for block tensors
            block, nbytes = gguf.GGML_QUANT_SIZES[raw] if raw is not None else (1, 1)
            size[types[tname]] = size.get(types[tname], 0) + arr.shape[0] * arr.shape[1] // nbytes * block
    top = max(size, key=size.get) if size else "F32"
    named = {"F32": LFT.ALL_F32, "F16": LFT.MOSTLY_F16, "Q4_K": LFT.MOSTLY_Q4_K_M, "Q5_K": LFT.MOSTLY_Q5_K_M}
    return named[top] if top in named else LFT[f"MOSTLY_{top}"]


def format_report(rep: dict) -> str:
    """One line: the file, its size and how many tensors of each type."""
    counts: dict[str, int] = {}
    for t in rep["tensors"].values():
        counts[t] = counts.get(t, 0) + 1
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    lossy = f"; {len(rep['lossy'])} re-quantized (lossy)" if rep["lossy"] else ""
    return f"wrote {rep['path']} ({rep['bytes'] / 2**20:.2f} MiB: {kinds}{lossy}; tokenizer {rep['tokenizer']})"


__all__ = ["export_gguf", "check_exportable", "exact_type", "encode_exact", "find_source_gguf", "format_report",
           "REQUANT_TYPES"]
