"""Perplexity, fidelity and sampling against hand-written loops; the evaluation texts against the raw files."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import SHARED, STORIES, needs_shared, tiny_model
from lowbit.config import QuantConfig, parse_spec
from lowbit.data import eval_ids, load_text
from lowbit.eval import fidelity, perplexity
from lowbit.quantize import quantize_model
from lowbit.sampling import sample_ids


class ToyTok:
    """The Tokenizer protocol over ids only (fidelity needs no text)."""

    def __init__(self, vocab_size: int = 128):
        self.vocab_size, self.bos_id, self.eos_id, self.name = vocab_size, 1, 2, "toy"

    def encode(self, text, add_bos=True):
        return [1] + [3 + ord(c) % 100 for c in text] if add_bos else [3 + ord(c) % 100 for c in text]

    def decode(self, ids):
        return " ".join(map(str, ids))

    def special_ids(self):
        return {0, 1, 2}


@pytest.fixture(scope="module")
def model():
    return tiny_model("LlamaForCausalLM")


def _oracle_nll(model, window: torch.Tensor) -> float:
    """Mean over positions 1..T-1 of -log p(x_t | x_<t), by hand."""
    with torch.no_grad():
        logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
    T = window.numel()
    return -sum(logp[t - 1, window[t]].item() for t in range(1, T)) / (T - 1)


# ------------------------------------------------------------------------------------------ perplexity
def test_perplexity_matches_oracle_and_drops_tail(model):
    seqlen = 16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3 * seqlen + 7,), generator=g)
    res = perplexity(model, ids, seqlen, progress=False)
    nlls = [_oracle_nll(model, ids[i * seqlen:(i + 1) * seqlen]) for i in range(3)]
    assert res["windows"] == res["windows_total"] == 3 and res["tokens"] == 48 and res["seqlen"] == seqlen
    assert len(res["window_nlls"]) == res["windows"]
    assert res["window_nlls"] == pytest.approx(nlls, rel=1e-5)
    assert res["nll"] == pytest.approx(sum(nlls) / 3, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(nlls) / 3), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]), rel=1e-12)
    # a random model is roughly uniform over 128 tokens
    assert 64 < res["ppl"] < 256

    # the tail (7 tokens) is dropped: changing it changes nothing
    ids2 = ids.clone()
    ids2[-7:] = (ids2[-7:] + 1) % 128
    assert perplexity(model, ids2, seqlen, progress=False)["window_nlls"] == res["window_nlls"]


def test_perplexity_max_windows(model):
    seqlen = 8
    ids = torch.randint(0, 128, (5 * seqlen,), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, ids, seqlen, progress=False)
    part = perplexity(model, ids, seqlen, max_windows=2, progress=False)
    assert part["windows"] == 2 and part["windows_total"] == 5 and len(part["window_nlls"]) == 2
    assert part["tokens"] == 16
    assert part["window_nlls"] == full["window_nlls"][:2]
    assert part["ppl"] == pytest.approx(math.exp(sum(full["window_nlls"][:2]) / 2), rel=1e-12)
    assert perplexity(model, ids, seqlen, max_windows=99, progress=False)["windows"] == 5


def test_perplexity_text_shorter_than_a_window(model):
    with pytest.raises(ValueError, match="window"):
        perplexity(model, torch.arange(15), 16, progress=False)


# ------------------------------------------------------------------------------------------- fidelity
def test_fidelity_self_is_perfect(model):
    res = fidelity(model, copy.deepcopy(model), ToyTok(), n=4, length=12, progress=False)
    assert abs(res["kl"]) < 1e-6 and res["top1_agreement"] == 1.0
    assert res["sequences"] == 4 and res["length"] == 12


def test_fidelity_int2_copy_differs_and_matches_hand_kl(model):
    q = quantize_model(copy.deepcopy(model), QuantConfig(weight=parse_spec("int2", "channel")), progress=False)
    tok = ToyTok()
    res = fidelity(model, q, tok, n=4, length=12, batch_size=4, seed=0, progress=False)
    assert res["kl"] > 1e-4 and 0 <= res["top1_agreement"] < 1.0
    # hand KL(p_fp || p_q) on the same sampled sequences (one batch, seed 0)
    ids = sample_ids(model, 4, 12, seed=0, bos_id=1, first_token_pool=torch.arange(3, 128))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.double(), -1)
        lq = torch.log_softmax(q(ids).logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    assert res["kl"] == pytest.approx(kl, rel=1e-4)
    assert res["top1_agreement"] == pytest.approx(agree)
    # and the reverse direction is a different number (KL is not symmetric)
    assert abs((lq.exp() * (lq - lp)).sum(-1).mean().item() - kl) > 1e-9


def test_fidelity_tokenizer_larger_than_model_vocab(model):
    """A tokenizer with more ids than the model (e.g. 512-piece stories tokenizer on a 128-word model):
    the random first tokens must still be ids the model has."""
    res = fidelity(model, copy.deepcopy(model), ToyTok(vocab_size=512), n=8, length=6, progress=False)
    assert res["top1_agreement"] == 1.0


# ------------------------------------------------------------------------------------------- sampling
def test_sample_ids_seeded_and_random_first_token(model):
    pool = torch.arange(3, 128)
    a = sample_ids(model, 16, 10, seed=3, bos_id=1, first_token_pool=pool)
    b = sample_ids(model, 16, 10, seed=3, bos_id=1, first_token_pool=pool)
    c = sample_ids(model, 16, 10, seed=4, bos_id=1, first_token_pool=pool)
    assert a.shape == (16, 10) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[:, 0] == 1).all()
    assert len(set(a[:, 1].tolist())) > 1  # the first token is drawn at random, not greedily
    assert all(int(t) in set(pool.tolist()) for t in a[:, 1])
    assert ((a >= 0) & (a < 128)).all()
    nobos = sample_ids(model, 4, 5, seed=3)
    assert nobos.shape == (4, 5)


def test_sample_ids_greedy_equals_uncached_argmax(model):
    """temperature 0: every token after the random first one is the argmax of a full (uncached) forward."""
    seq = sample_ids(model, 3, 9, seed=0, bos_id=1, first_token_pool=torch.arange(3, 128), temperature=0)
    with torch.no_grad():
        for t in range(2, 9):
            assert torch.equal(model(seq[:, :t]).logits[:, -1].argmax(-1), seq[:, t])
    # greedy_prefix: the first k generated tokens are greedy even when sampling
    s = sample_ids(model, 3, 9, seed=0, bos_id=1, first_token_pool=torch.arange(3, 128), greedy_prefix=3)
    assert torch.equal(s[:, :5], seq[:, :5])


# ------------------------------------------------------------------------------------------- data
@needs_shared
def test_wikitext2_text_follows_hf_rows():
    text = load_text("wikitext2")
    # the Hugging Face loader yields every line of wiki.test.raw: a non-blank line with its newline,
    # a blank one (the file writes " \n") as ""; GPTQ joins the rows with "\n\n"
    with open(SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw", "rb") as f:
        raw_lines = f.read().decode("utf-8").split("\n")
    assert raw_lines[-1] == ""  # the file ends with a newline
    rows = [ln + "\n" if ln.strip() else "" for ln in raw_lines[:-1]]
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n" and rows[2] == ""
    assert text == "\n\n".join(rows)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert len(text) == sum(map(len, rows)) + 2 * 4357


@needs_shared
def test_tinystories_eval_ids_one_bos_per_heldout_story():
    from lowbit.tokenizer import SPTokenizer

    tok = SPTokenizer(STORIES / "tok512.model")
    ids = eval_ids("tinystories", tok)
    raw = (SHARED / "data" / "tinystories" / "tinystories_train_head_2MiB.txt").read_text(encoding="utf-8")
    chunks = raw.split("<|endoftext|>")
    stories = [c.strip() for c in chunks[:-1] if c.strip()]  # the cut-off last chunk is dropped
    assert chunks[-1].strip() and len(stories) == 2316
    heldout = stories[-round(len(stories) * 0.1):]
    assert ids.dtype == torch.long and ids.dim() == 1 and ids[0].item() == 1
    assert (ids == 1).sum().item() == len(heldout) == 232
    starts = (ids == 1).nonzero()[:, 0].tolist() + [ids.numel()]
    assert tok.decode(ids[starts[0] + 1:starts[1]].tolist()) == heldout[0]
    assert tok.decode(ids[starts[-2] + 1:].tolist()) == heldout[-1]


@needs_shared
def test_tinystories_train_eval_ids_are_training_stories_never_heldout():
    """The tuning set: the first training stories, as many as the held-out set has, none of them held out."""
    from lowbit.tokenizer import SPTokenizer

    tok = SPTokenizer(STORIES / "tok512.model")
    ids, held = eval_ids("tinystories-train", tok), eval_ids("tinystories", tok)
    raw = (SHARED / "data" / "tinystories" / "tinystories_train_head_2MiB.txt").read_text(encoding="utf-8")
    stories = [c.strip() for c in raw.split("<|endoftext|>")[:-1] if c.strip()]
    assert (ids == 1).sum().item() == (held == 1).sum().item() == 232
    starts = (ids == 1).nonzero()[:, 0].tolist() + [ids.numel()]
    assert ids[:starts[1]].tolist() == tok.encode(stories[0], add_bos=True)
    assert ids[starts[-2]:].tolist() == tok.encode(stories[231], add_bos=True)  # the 232nd story, far from the held-out


def test_unknown_dataset_name():
    with pytest.raises(FileNotFoundError, match="wikitext2"):
        load_text("no-such-dataset")


def test_perplexity_resumes_exactly_after_an_interruption():
    """An evaluation killed after 2 windows and resumed from the saved NLLs equals an uninterrupted one."""
    model = tiny_model("LlamaForCausalLM")
    ids = torch.randint(0, 128, (5 * 16 + 3,), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, ids, 16, progress=False)

    saved: list[float] = []

    class Killed(Exception):
        pass

    def save_then_die(nlls):
        saved[:] = nlls
        if len(nlls) == 2:
            raise Killed

    with pytest.raises(Killed):
        perplexity(model, ids, 16, progress=False, on_window=save_then_die)
    assert len(saved) == 2
    resumed = perplexity(model, ids, 16, progress=False, done=saved)
    assert resumed["windows_resumed"] == 2 and resumed["windows"] == 5
    assert resumed["window_nlls"] == full["window_nlls"] and resumed["ppl"] == full["ppl"]
