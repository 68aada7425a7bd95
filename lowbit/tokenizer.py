"""One small tokenizer interface over Hugging Face tokenizers and raw sentencepiece models.

transformers 5's ``LlamaTokenizer`` returns no tokens for llama2.c's ``tok512.model``, so
sentencepiece files are read with the ``sentencepiece`` package directly. Everything in lowbit
talks to a :class:`Tokenizer`: ``encode``/``decode`` plus the ids it needs for generation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What lowbit needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    name: str

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def special_ids(self) -> set[int]: ...


class SPTokenizer:
    """A sentencepiece ``.model`` file (llama2.c's tok512 and friends); BOS is prepended by us."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path} (pass the .model file)")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.path = path
        self.name = f"sentencepiece:{path.name}"
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def special_ids(self) -> set[int]:
        return {i for i in range(self.vocab_size)
                if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)}


class HFTokenizer:
    """A transformers tokenizer; ``add_bos`` means "add the tokenizer's own special tokens"."""

    def __init__(self, tok, name: str = "hf"):
        self.tok = tok
        self.name = name
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_bos)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_ids(self) -> set[int]:
        return set(int(i) for i in self.tok.all_special_ids)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a sentencepiece ``.model`` file or a folder saved by transformers."""
    path = Path(path)
    if path.suffix == ".model":
        return SPTokenizer(path)
    if path.is_dir() and (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        return SPTokenizer(path / "tokenizer.model")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path)), name=str(path))
