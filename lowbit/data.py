"""Evaluation texts, built the way the GPTQ protocol builds them (METHODS.md section 8.1).

* ``wikitext2``: WikiText-2 raw *test*. Rows are the file's lines as the Hugging Face loader yields
  them (a non-blank line with its newline, a blank line as ``""``), joined with ``"\\n\\n"`` and
  tokenized in one call (the tokenizer adds its own BOS, if any, once at the start).
* ``c4``: the C4-en validation *sample* in ../shared (2,000 documents; not GPTQ's shard 0, see
  SOURCES.md): ``" ".join`` of the first 1,100 documents, first ``256 * seqlen`` tokens (GPTQ's
  ``c4_new`` recipe). Calibration sets draw from the other 900 documents only.
* ``ptb``: Penn Treebank test, ``" ".join`` of its stripped lines (GPTQ's ``ptb_new``).
* ``tinystories``: the held-out last 10% of the stories of the TinyStories sample (its cut-off
  last story dropped), each story ``[BOS] + tokens`` as llama2.c trains stories260K.
* ``tinystories-train``: the first stories of the *training* 90% of the same sample, as many as
  the held-out set has, each ``[BOS] + tokens``: a tuning set, so settings are chosen without
  looking at the held-out text (the training windows of ``--calib tinystories`` can overlap it).
* any other name is read as a path to a UTF-8 text file, tokenized in one call.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from .models import shared_dir
from .tokenizer import Tokenizer

DATASETS = ("wikitext2", "c4", "ptb", "tinystories", "tinystories-train")
C4_EVAL_DOCS = 1100


def data_dir() -> Path:
    sh = shared_dir()
    if sh is None or not (sh / "data").is_dir():
        raise FileNotFoundError("no data folder: set LOWBIT_SHARED to the folder that holds data/ (../shared)")
    return sh / "data"


def _need(p: Path) -> Path:
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p} (set LOWBIT_SHARED to the folder that holds data/)")
    return p


def c4_documents() -> list[str]:
    p = _need(data_dir() / "c4" / "c4_validation_2k.derived.jsonl.gz")
    with gzip.open(p, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def tinystories_split() -> tuple[list[str], list[str]]:
    """(training stories, held-out stories): the last 10% of the stories of the sample are held out."""
    from .train import load_stories, split_stories

    return split_stories(load_stories(_need(data_dir() / "tinystories" / "tinystories_train_head_2MiB.txt")), 0.1)


def tinystories_heldout() -> list[str]:
    return tinystories_split()[1]


def load_text(name: str) -> str:
    """The raw evaluation text of a named dataset (TinyStories: see :func:`eval_ids`)."""
    if name == "wikitext2":
        with open(_need(data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"), encoding="utf-8") as f:
            rows = [line if line.strip() else "" for line in f]
        return "\n\n".join(rows)
    if name == "c4":
        return " ".join(c4_documents()[:C4_EVAL_DOCS])
    if name == "ptb":
        with open(_need(data_dir() / "ptb" / "ptb.test.txt"), encoding="utf-8") as f:
            return " ".join(line.strip() for line in f)
    p = Path(name)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise FileNotFoundError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a path to a text file")


def eval_ids(name: str, tok: Tokenizer, seqlen: int | None = None) -> torch.Tensor:
    """The token ids (1-D LongTensor) on which perplexity is measured for ``name``."""
    if name in ("tinystories", "tinystories-train"):
        train, held = tinystories_split()
        ids: list[int] = []
        for story in (held if name == "tinystories" else train[:len(held)]):
            ids += tok.encode(story, add_bos=True)
        return torch.tensor(ids, dtype=torch.long)
    ids_t = torch.tensor(tok.encode(load_text(name), add_bos=True), dtype=torch.long)
    if name == "c4" and seqlen:
        ids_t = ids_t[: 256 * seqlen]
    return ids_t
