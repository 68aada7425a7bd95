"""Calibration sets for PTQ: ``n`` random windows of ``seqlen`` tokens, seeded.

* ``c4``: documents 1,100 onwards of the C4 validation sample. The first 1,100 are the C4
  evaluation text (:mod:`lowbit.data`), so calibration never sees evaluation text. Documents are
  tokenized one by one and joined with the EOS id (BOS first if the tokenizer adds one), then
  windows start at random offsets (GPTQ draws random windows from random C4 documents; the sample's
  documents are mostly shorter than 2048 tokens, hence the joining).
* any other name is a path to a text file, tokenized in one call.

Data-free methods use none of this: they calibrate on text the model generates itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import C4_EVAL_DOCS, c4_documents
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
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"calibration source {source!r} not found: use 'c4' or a path to a text file")
    return torch.tensor(tok.encode(p.read_text(encoding="utf-8"), add_bos=True), dtype=torch.long)


def calibration_batches(tok: Tokenizer, source: str = "c4", n: int = 128, seqlen: int = 2048,
                        seed: int = 0) -> torch.Tensor:
    """``(n, seqlen)`` token ids from random offsets of the source, reproducible from ``seed``."""
    ids = calibration_text_ids(source, tok)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration source {source!r} has {ids.numel()} tokens, fewer than one window of "
                         f"{seqlen}; use a shorter --seqlen or more text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
