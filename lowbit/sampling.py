"""Batched, seeded sampling of token ids from a causal LM with its KV cache.

Generation from an empty prompt follows METHODS.md section 6.1: ``[BOS]`` (if the tokenizer has
one), then a first token drawn uniformly from the non-special vocabulary (a greedy first token
would give every sample the same prefix), ``greedy_prefix`` greedy tokens, then sampling with
``temperature`` / ``top_p`` to ``length`` tokens. One ``torch.Generator`` seeded with ``seed``
drives every random choice, so the same seed gives the same ids.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def filter_logits(logits: Tensor, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose mass reaches
    top_p (along the last dimension; the most likely token is always kept)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        p = torch.softmax(sorted_logits, -1)
        drop = p.cumsum(-1) - p >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.inference_mode()
def sample_ids(model: nn.Module, n: int, length: int, *, seed: int = 0, bos_id: int | None = None,
               first_token_pool: Tensor | None = None, greedy_prefix: int = 0, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, vocab_size: int | None = None) -> Tensor:
    """``n`` sequences of ``length`` ids each (BOS included when given), shape ``(n, length)``."""
    gen = torch.Generator().manual_seed(seed)
    vocab_size = vocab_size or model.config.vocab_size
    pool = first_token_pool if first_token_pool is not None else torch.arange(vocab_size)
    first = pool[torch.randint(len(pool), (n,), generator=gen)]
    seq = first[:, None] if bos_id is None else torch.stack([torch.full((n,), bos_id), first], 1)
    device = next(model.parameters()).device
    seq = seq.to(device)
    out = model(seq, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1, :vocab_size].float()
    while seq.shape[1] < length:
        step = seq.shape[1] - (1 if bos_id is None else 2)  # tokens generated after the first
        if step < greedy_prefix or temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_p, top_k), -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(device)
        seq = torch.cat([seq, nxt[:, None]], 1)
        out = model(nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :vocab_size].float()
    return seq[:, :length].cpu()
