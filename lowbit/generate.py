"""Reproducible text sampling with a KV cache.

``model.generate`` draws from torch's global RNG, so its samples depend on whatever ran before.
:func:`generate` runs its own token loop with a private ``torch.Generator`` (on the CPU, so the
same seed gives the same text whatever device the model is on).
"""
from __future__ import annotations

import torch

from .sampling import filter_logits
from .tokenizer import Tokenizer


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
            gen: torch.Generator) -> int:
    """Pick one token id from a 1-D logits vector (greedy when temperature <= 0)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits / temperature, top_p, top_k), dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model: torch.nn.Module, tok: Tokenizer, prompt: str = "", max_new_tokens: int = 100,
             temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int = 0) -> str:
    """Sample a continuation of ``prompt``; return only the new text.

    temperature 0 is greedy decoding; ``top_k`` 0 and ``top_p`` 1 disable those filters. An empty
    prompt starts from BOS alone. Generation stops at EOS, after ``max_new_tokens`` or at the
    model's context length.
    """
    if prompt:
        prompt_ids = tok.encode(prompt, add_bos=True)
    elif tok.bos_id is not None:
        prompt_ids = [tok.bos_id]
    else:
        raise ValueError("empty prompt and the tokenizer has no BOS token: pass a non-empty prompt")
    device = next(model.parameters()).device
    max_len = getattr(model.config, "max_position_embeddings", None) or (len(prompt_ids) + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    new_ids: list[int] = []
    try:
        inp = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        past = None
        while len(new_ids) < max_new_tokens and len(prompt_ids) + len(new_ids) < max_len:
            out = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = _sample(out.logits[0, -1].float().cpu(), temperature, top_p, top_k, gen)
            if tok.eos_id is not None and nxt == tok.eos_id:
                break
            new_ids.append(nxt)
            inp = torch.tensor([[nxt]], dtype=torch.long, device=device)
    finally:
        model.train(was_training)
    # Decode prompt + continuation together so the first new word keeps its leading space
    # (sentencepiece drops it when a piece is decoded on its own).
    head = tok.decode(prompt_ids)
    full = tok.decode(prompt_ids + new_ids)
    return full[len(head):] if full.startswith(head) else tok.decode(new_ids)
