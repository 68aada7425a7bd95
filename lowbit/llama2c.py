"""Read llama2.c checkpoints ("version 0" ``.bin`` files) into transformers' ``LlamaForCausalLM``.

File layout (little-endian, no padding), as written by llama2.c's legacy exporter:

* header: 7 x int32 = ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len``.
  A *negative* ``vocab_size`` means the output classifier is stored separately (not tied to the
  token embedding); its absolute value is the vocabulary size.
* then fp32 arrays, in this order (``L`` = n_layers, ``kv_dim = dim * n_kv_heads / n_heads``)::

      token_embedding  vocab x dim
      rms_att          L x dim
      wq               L x dim x dim
      wk               L x kv_dim x dim
      wv               L x kv_dim x dim
      wo               L x dim x dim
      rms_ffn          L x dim
      w1 (gate_proj)   L x hidden x dim
      w2 (down_proj)   L x dim x hidden
      w3 (up_proj)     L x hidden x dim
      rms_final        dim
      freq_cis_real    max_seq_len x head_size/2   (unused: RoPE is recomputed by transformers)
      freq_cis_imag    max_seq_len x head_size/2
      wcls             vocab x dim                 (only when not shared)

llama2.c applies RoPE to interleaved pairs ``(x[2i], x[2i+1])`` of each head, while transformers'
``rotate_half`` pairs ``x[i]`` with ``x[i + head_dim/2]``. The q/k projection rows are permuted
accordingly so that the converted model computes the same function.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

log = logging.getLogger(__name__)

_HEADER = 7  # int32 fields
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions, not supported here


def _hf_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k rows from llama2.c's interleaved rotary pairs to HF's rotate_half layout."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _float_count(dim: int, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 vocab: int, max_seq_len: int, shared: bool) -> int:
    kv_dim = dim * n_kv_heads // n_heads
    head_size = dim // n_heads
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim
    n = vocab * dim + n_layers * per_layer + dim + 2 * max_seq_len * (head_size // 2)
    return n + (0 if shared else vocab * dim)


def read_llama2c(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Parse a llama2.c version-0 checkpoint into a ``LlamaConfig`` and an HF-named fp32 state dict.

    The state dict has the same keys as ``save_pretrained`` writes: ``lm_head.weight`` is only
    present when the classifier is not shared with the embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path} (pass the path of a .bin file)")
    size = path.stat().st_size
    hint = "is this a llama2.c version-0 checkpoint?"
    if size < 4 * _HEADER:
        raise ValueError(f"{path.name}: file is only {size} bytes, too small for the 28-byte llama2.c header; "
                         f"{hint}")
    raw = bytearray(path.read_bytes())  # writable buffer: torch.frombuffer warns on read-only bytes
    head = [int(x) for x in np.frombuffer(raw, dtype="<i4", count=_HEADER)]
    if head[0] == _V1_MAGIC:
        raise ValueError(f"{path.name}: starts with the 'ak42' magic of llama2.c export version >= 1; "
                         "only the legacy version-0 format is supported (re-export with version=0)")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab_signed, max_seq_len = head
    shared = vocab_signed > 0
    vocab = abs(vocab_signed)
    fields = (f"dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, n_heads={n_heads}, "
              f"n_kv_heads={n_kv_heads}, vocab_size={vocab_signed}, max_seq_len={max_seq_len}")
    problems = []
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, max_seq_len) <= 0:
        problems.append("all header fields must be positive (vocab_size may be negative)")
    elif dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        problems.append("n_heads must divide dim, n_kv_heads must divide n_heads and head size must be even")
    if problems:
        raise ValueError(f"{path.name}: invalid header ({fields}): {problems[0]}; {hint}")
    n_floats = _float_count(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, max_seq_len, shared)
    expected = 4 * (_HEADER + n_floats)
    if size != expected:
        raise ValueError(f"{path.name}: expected {expected} bytes for header ({fields}) but found {size}; "
                         f"{'truncated file or ' if size < expected else ''}{hint}")

    flat = torch.frombuffer(raw, dtype=torch.float32, offset=4 * _HEADER, count=n_floats)
    if not np.little_endian:  # the format is little-endian; frombuffer uses native order
        flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=4 * _HEADER, count=n_floats).astype("=f4"))
    kv_dim = dim * n_kv_heads // n_heads
    head_size = dim // n_heads
    pos = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal pos
        n = math.prod(shape)
        t = flat[pos:pos + n].view(*shape).clone()  # clone: own memory, independent of `raw`
        pos += n
        return t

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    freq_real = take(max_seq_len, head_size // 2)
    take(max_seq_len, head_size // 2)  # freq_cis_imag: implied by freq_cis_real
    wcls = None if shared else take(vocab, dim)
    assert pos == n_floats

    # llama2.c always uses theta = 10000; warn if the stored RoPE table says otherwise.
    if max_seq_len > 1:
        inv = 10000.0 ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        if not torch.allclose(freq_real[1].double(), torch.cos(inv), atol=1e-4):
            log.warning("%s: stored RoPE table does not match rope_theta=10000; outputs may differ", path.name)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "self_attn.q_proj.weight"] = _hf_rotary_rows(wq[i], n_heads).contiguous()
        sd[p + "self_attn.k_proj.weight"] = _hf_rotary_rows(wk[i], n_kv_heads).contiguous()
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    if wcls is not None:
        sd["lm_head.weight"] = wcls

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_size,
        max_position_embeddings=max_seq_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2, hidden_act="silu",
        attention_bias=False, mlp_bias=False,
    )
    return config, sd


def load_llama2c(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a llama2.c version-0 checkpoint as an HF ``LlamaForCausalLM`` in eval mode."""
    config, sd = read_llama2c(path)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"{Path(path).name}: state dict mismatch: missing={missing}, unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.to(dtype).eval()
