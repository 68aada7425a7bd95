"""Calibration sets for PTQ: ``n`` random windows of ``seqlen`` tokens, seeded.

* ``c4``: documents 1,100 onwards of the C4 validation sample. The first 1,100 are the C4
  evaluation text (:mod:`lowbit.data`), so calibration never sees evaluation text. Documents are
  tokenized one by one and joined with the EOS id (BOS first if the tokenizer adds one), then
  windows start at random offsets (GPTQ draws random windows from random C4 documents; the sample's
  documents are mostly shorter than 2048 tokens, hence the joining).
* ``tinystories``: the training stories (first 90%) of the TinyStories sample, each ``[BOS] + story``;
  the held-out 10% that :mod:`lowbit.data` evaluates on is never used.
* any other name is a path to a text file, tokenized in one call.
* ``self``: no data at all. The float model writes the windows itself (METHODS.md 6.1, LLM-QAT
  style): BOS, a first token drawn uniformly from the non-special vocabulary, 3 greedy tokens, then
  sampling at temperature 1 from the top 50, all seeded. This lets PTQ methods run data-free too.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import C4_EVAL_DOCS, c4_documents, tinystories_split
from .tokenizer import Tokenizer


def calibration_text_ids(source: str, tok: Tokenizer) -> torch.Tensor:
    """The 1-D token stream calibration windows are drawn from."""
    if source == "c4":
        ids: list[int] = []
        for doc in c4_documents()[C4_EVAL_DOCS:]:
            ids += tok.encode(doc, add_bos=True)
            if tok.eos_id is not None:
                ids.append(tok.eos_id)
        return torch.tensor(ids, dtype=torch.long)
    if source == "tinystories":
        ids = []
        for story in tinystories_split()[0]:
            ids += tok.encode(story, add_bos=True)
        return torch.tensor(ids, dtype=torch.long)
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"calibration source {source!r} not found: use 'c4', 'tinystories', 'self' or a path "
                                "to a text file")
    return torch.tensor(tok.encode(p.read_text(encoding="utf-8"), add_bos=True), dtype=torch.long)


def self_generated_batches(model: nn.Module, tok: Tokenizer, n: int = 128, seqlen: int = 2048, seed: int = 0,
                           batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """``(n, seqlen)`` token ids sampled from ``model`` itself from an empty prompt (no data). Each batch has its
    own seed, so with several processes (:mod:`lowbit.distributed`) each samples its share of the batches and
    all get the whole, single-process result."""
    from . import distributed
    from .sampling import sample_ids

    vocab = min(tok.vocab_size, model.config.vocab_size)
    pool = torch.tensor(sorted(set(range(vocab)) - tok.special_ids()))
    starts = range(0, n, batch_size)
    mine = [starts[i] for i in distributed.share(len(starts))]
    out = [torch.zeros(0, seqlen, dtype=torch.long)]
    for b in tqdm(mine, desc="self-calibration", disable=not (progress and distributed.is_main()), unit="batch"):
        m = min(batch_size, n - b)
        out.append(sample_ids(model, m, seqlen, seed=seed * 100003 + b, bos_id=tok.bos_id, first_token_pool=pool,
                              greedy_prefix=3, temperature=1.0, top_k=50, vocab_size=vocab))
    return distributed.all_gather_cat(torch.cat(out))


def calibration_batches(tok: Tokenizer, source: str = "c4", n: int = 128, seqlen: int = 2048,
                        seed: int = 0, model: nn.Module | None = None, progress: bool = True) -> torch.Tensor:
    """``(n, seqlen)`` token ids from random offsets of the source, reproducible from ``seed``.
    ``source="self"`` samples them from ``model`` (see the module docstring)."""
    if source == "self":
        if model is None:
            raise ValueError("calibration source 'self' needs the model that generates the text")
        return self_generated_batches(model, tok, n, seqlen, seed, progress=progress)
    ids = calibration_text_ids(source, tok)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than one window of "
                         f"{seqlen}; use a shorter --seqlen or more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
