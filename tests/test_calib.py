"""Calibration sets: seeded, the right shape, and never drawn from the C4 evaluation documents."""
from __future__ import annotations

import pytest
import torch

import lowbit.calib as calib
from conftest import STORIES, needs_shared
from lowbit.tokenizer import SPTokenizer


@pytest.fixture
def tok():
    if not (STORIES / "tok512.model").is_file():
        pytest.skip("../shared not present")
    return SPTokenizer(STORIES / "tok512.model")


def test_c4_calibration_skips_the_evaluation_documents(tok, monkeypatch):
    # 1100 evaluation documents made only of 'a', then calibration documents made only of 'z'
    docs = ["a a a a"] * calib.C4_EVAL_DOCS + ["z z z z z z z z"] * 50
    monkeypatch.setattr(calib, "c4_documents", lambda: docs)
    ids = calib.calibration_text_ids("c4", tok)
    a_id = tok.encode(" a", add_bos=False)[-1]
    assert a_id not in set(ids.tolist())
    b = calib.calibration_batches(tok, "c4", n=6, seqlen=32, seed=0)
    assert b.shape == (6, 32) and b.dtype == torch.long


@needs_shared
def test_seeded_and_too_short(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Once upon a time there was a little dog. " * 200)
    a = calib.calibration_batches(tok, str(f), n=4, seqlen=64, seed=1)
    assert torch.equal(a, calib.calibration_batches(tok, str(f), n=4, seqlen=64, seed=1))
    assert not torch.equal(a, calib.calibration_batches(tok, str(f), n=4, seqlen=64, seed=2))
    with pytest.raises(ValueError, match="fewer than one window"):
        calib.calibration_batches(tok, str(f), n=1, seqlen=100_000)
    with pytest.raises(FileNotFoundError, match="not found"):
        calib.calibration_batches(tok, str(tmp_path / "missing.txt"))


@needs_shared
def test_real_c4_sample(tok):
    b = calib.calibration_batches(tok, "c4", n=3, seqlen=128, seed=0)
    assert b.shape == (3, 128) and int(b.max()) < tok.vocab_size


@needs_shared
def test_self_calibration_is_seeded_and_uses_no_data(monkeypatch):
    """--calib self: windows sampled from the model itself, the same for the same seed, never read from disk."""
    import lowbit.calib as calib
    from lowbit.models import load_model

    model, tok = load_model("stories260k")
    monkeypatch.setattr(calib, "calibration_text_ids", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read data")))
    a = calib.calibration_batches(tok, "self", n=3, seqlen=24, seed=5, model=model)
    b = calib.calibration_batches(tok, "self", n=3, seqlen=24, seed=5, model=model)
    c = calib.calibration_batches(tok, "self", n=3, seqlen=24, seed=6, model=model)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tok.bos_id).all() and len(set(a[:, 1].tolist())) > 1  # random first tokens, no collapse


@needs_shared
def test_tinystories_calibration_never_sees_heldout_text():
    from lowbit.data import tinystories_split

    train, held = tinystories_split()
    assert set(train).isdisjoint(held) and len(held) > 0
