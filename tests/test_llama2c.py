"""llama2.c checkpoint conversion: exact match with the reference HF export, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.llama2c import load_llama2c, read_llama2c

from conftest import SHARED  # noqa: E402  (conftest sets one torch thread for all tests)
STORIES = SHARED / "models" / "stories260K"
BIN = STORIES / "stories260K.bin"


def _need_shared() -> None:
    if not BIN.is_file():
        pytest.skip(f"{BIN} not available")


def test_matches_hf_export_exactly() -> None:
    _need_shared()
    from safetensors.torch import load_file

    config, sd = read_llama2c(BIN)
    ref = load_file(str(STORIES / "hf" / "model.safetensors"))
    assert set(sd) == set(ref)
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k

    ref_cfg = json.loads((STORIES / "hf" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(config, key) == ref_cfg[key], key
    assert config.rope_parameters["rope_theta"] == ref_cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings and config.max_position_embeddings == 512


def test_load_model_is_tied_and_matches_hf_logits() -> None:
    _need_shared()
    from transformers import LlamaForCausalLM

    model = load_llama2c(BIN)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = LlamaForCausalLM.from_pretrained(str(STORIES / "hf"), dtype=torch.float32).eval()
    x = torch.tensor([[1, 403, 407, 261, 378, 425, 261]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)


def test_truncated_file_raises_value_error(tmp_path: Path) -> None:
    _need_shared()
    bad = tmp_path / "cut.bin"
    bad.write_bytes(BIN.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut\.bin.*expected 1056540 bytes.*found 1000") as e:
        read_llama2c(bad)
    assert "\n" not in str(e.value)


def test_garbage_header_raises_value_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.bin"
    bad.write_bytes(b"not a checkpoint at all, just some text bytes")
    with pytest.raises(ValueError, match=r"junk\.bin"):
        read_llama2c(bad)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"tiny\.bin.*too small"):
        read_llama2c(tiny)


def test_untied_classifier_roundtrip(tmp_path: Path) -> None:
    """A synthetic checkpoint with negative vocab_size gets a separate lm_head, read from the tail."""
    import numpy as np

    dim, hidden, layers, heads, kv, vocab, seq = 8, 12, 1, 2, 1, 16, 4
    head = np.array([dim, hidden, layers, heads, kv, -vocab, seq], dtype="<i4")
    kv_dim, hs = dim * kv // heads, dim // heads
    n = (vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim) + dim
         + 2 * seq * (hs // 2))
    body = np.arange(n + vocab * dim, dtype="<f4")
    path = tmp_path / "untied.bin"
    path.write_bytes(head.tobytes() + body.tobytes())
    config, sd = read_llama2c(path)
    assert not config.tie_word_embeddings
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(body[n:].copy()).view(vocab, dim))
    model = load_llama2c(path)
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.bin"):
        read_llama2c(tmp_path / "nope.bin")
