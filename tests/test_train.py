"""Stage-0 training: data handling, reproducibility, exact resume, checkpoint format, guards."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lowbit.train import (TrainConfig, get_batch, heldout_perplexity, load_stories, lr_at, split_stories,
                          stories_to_ids, train)

from conftest import SHARED  # noqa: E402  (conftest sets one torch thread for all tests)
TOK = SHARED / "models" / "stories260K" / "tok512.model"
TEXT = SHARED / "data" / "tinystories" / "tinystories_train_head_2MiB.txt"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first 40 TinyStories stories (or a synthetic text), plus an unfinished last story."""
    if not TOK.is_file():
        pytest.skip("shared tok512.model not available")
    if TEXT.is_file():
        with open(TEXT, encoding="utf-8") as f:
            head = f.read(60_000)
        stories = head.split("\n<|endoftext|>\n")[:40]
    else:
        stories = [f"Story {i}. Once upon a time there was a cat named Tom {i}. Tom liked to play in the sun."
                   for i in range(40)]
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\nAn unfinished story that")
    return path


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=data, tokenizer=TOK, out=out, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32,
                seq_len=32, batch_size=4, steps=6, warmup=2, lr=5e-3, min_lr=5e-4, eval_every=3, save_every=3,
                eval_windows=2)
    base.update(kw)
    return TrainConfig(**base)


def test_stories_split_and_ids(data_file: Path) -> None:
    from lowbit.tokenizer import SPTokenizer

    stories = load_stories(data_file)
    assert len(stories) == 40 and "unfinished" not in stories[-1]
    assert all("<|endoftext|>" not in s and s == s.strip() for s in stories)
    train_st, held = split_stories(stories, 0.1)
    assert train_st + held == stories and len(held) == 4
    tok = SPTokenizer(TOK)
    ids = stories_to_ids(stories[:2], tok)
    assert ids.dtype == torch.long
    assert ids.tolist() == [tok.bos_id] + tok.encode(stories[0], add_bos=False) + tok.encode(stories[1])
    x, y = get_batch(torch.arange(100), 8, 3, seed=0, step=5)
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, get_batch(torch.arange(100), 8, 3, seed=0, step=5)[0])


def test_load_stories_edge_cases(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("A b.\n<|endoftext|>\n\n<|endoftext|>\nC d.<|endoftext|>\nE f.\n<|endoftext|>\n")
    assert load_stories(p) == ["A b.", "C d.", "E f."]
    p.write_text("no separator at all")
    with pytest.raises(ValueError, match="t.txt"):
        load_stories(p)
    with pytest.raises(FileNotFoundError):
        load_stories(tmp_path / "missing.txt")


def test_lr_schedule() -> None:
    cfg = TrainConfig(data="x", tokenizer="x", out="x", lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 60) == pytest.approx(0.55) and lr_at(cfg, 110) == pytest.approx(0.1)


def test_heldout_perplexity_of_uniform_model() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    assert heldout_perplexity(Uniform(), torch.arange(40) % 50, seq_len=8, max_windows=3) == pytest.approx(50)


def test_same_seed_same_losses_and_checkpoint_format(data_file: Path, tmp_path: Path) -> None:
    a = train(tiny(data_file, tmp_path / "a"), progress=False)
    b = train(tiny(data_file, tmp_path / "b"), progress=False)
    c = train(tiny(data_file, tmp_path / "c", seed=1), progress=False)
    assert len(a["losses"]) == 6 and a["steps"] == 6
    assert a["losses"] == b["losses"] and a["heldout_ppl"] == b["heldout_ppl"]
    assert a["losses"] != c["losses"]
    assert a["tokens_seen"] == 6 * 4 * 32 and math.isfinite(a["heldout_ppl"])

    out = tmp_path / "a"
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 6 and state["losses"] == a["losses"] and "optimizer" in state
    log = json.loads((out / "train_log.json").read_text())
    assert log["losses"] == a["losses"] and log["seed"] == 0 and log["config"]["dim"] == 16
    # The run folder is a loadable model folder.
    from transformers import LlamaForCausalLM

    from lowbit.tokenizer import load_tokenizer

    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.hidden_size == 16 and model.config.tie_word_embeddings
    assert load_tokenizer(out).vocab_size == 512
    assert not list(out.glob("*.tmp")) and not list(out.glob(".ckpt-*"))


def test_resume_is_exact(data_file: Path, tmp_path: Path) -> None:
    straight = train(tiny(data_file, tmp_path / "straight"), progress=False)
    part = train(tiny(data_file, tmp_path / "resumed", stop_after=3), progress=False)
    assert part["steps"] == 3 and part["losses"] == straight["losses"][:3]
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)["step"] == 3
    rest = train(tiny(data_file, tmp_path / "resumed"), resume=True, progress=False)
    assert rest["steps"] == 6
    assert rest["losses"] == straight["losses"]
    assert rest["heldout_ppl"] == straight["heldout_ppl"]


def test_resume_without_checkpoint_starts_fresh(data_file: Path, tmp_path: Path) -> None:
    r = train(tiny(data_file, tmp_path / "fresh", steps=2, eval_every=0), resume=True, progress=False)
    assert r["steps"] == 2 and len(r["losses"]) == 2


def test_existing_run_needs_resume(data_file: Path, tmp_path: Path) -> None:
    cfg = tiny(data_file, tmp_path / "run", steps=1, eval_every=0)
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match="lr"):  # resuming with a different recipe is refused
        train(dataclasses.replace(cfg, lr=1e-3), resume=True, progress=False)


def test_nan_loss_stops_without_saving(data_file: Path, tmp_path: Path) -> None:
    cfg = tiny(data_file, tmp_path / "nan", lr=1e30, min_lr=1e29, warmup=1, steps=4, save_every=1)
    with pytest.raises(RuntimeError, match=r"step \d.*lower --lr"):
        train(cfg, progress=False)
    state_file = tmp_path / "nan" / "state.pt"
    if state_file.is_file():  # whatever was saved is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan" / "model.safetensors").values())


def test_loss_decreases(data_file: Path, tmp_path: Path) -> None:
    r = train(tiny(data_file, tmp_path / "long", steps=30, warmup=3, lr=1e-2, min_lr=1e-3, eval_every=0,
                   save_every=0), progress=False)
    first, last = sum(r["losses"][:5]) / 5, sum(r["losses"][-5:]) / 5
    assert first > last + 0.3, (first, last)
