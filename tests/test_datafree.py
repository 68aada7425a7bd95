"""Self-generated data (Stage 2): layout, reproducibility, resume, checksums, teacher top-k, diversity, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_shared, tiny_model
from lowbit.datafree import batches, diversity_stats, generate_dataset, load_dataset, shard_name


class FakeTok:
    """What generation needs from a tokenizer, for the tiny random models (vocab 128)."""

    name = "fake"
    bos_id, eos_id, vocab_size = 1, 2, 128

    def special_ids(self):
        return {0, 1, 2}


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("LlamaForCausalLM")


@pytest.fixture(scope="module")
def stories():
    import lowbit

    return lowbit.load_model("stories260k")


def _gen(model, out, **kw):
    kw = dict(dict(n_sequences=5, seq_len=12, batch_size=2, shard_size=4, progress=False), **kw)
    return generate_dataset(model, FakeTok(), out, **kw)


def test_layout_shapes_dtypes_and_meta(tiny, tmp_path):
    meta = _gen(tiny, tmp_path, topk_logits=3)
    assert [e["file"] for e in meta["shards"]] == [shard_name(0), shard_name(1)]
    assert [e["n"] for e in meta["shards"]] == [4, 1] and meta["n_sequences"] == 5 and meta["n_tokens"] == 60
    from safetensors.torch import load_file

    t = load_file(tmp_path / shard_name(0))
    assert t["ids"].dtype == torch.int32 and t["ids"].shape == (4, 12)
    assert t["topk_values"].dtype == torch.float16 and t["topk_values"].shape == (4, 12, 3)
    assert t["topk_indices"].dtype == torch.int32 and t["logsumexp"].dtype == torch.float32
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    s = on_disk["settings"]
    assert (s["seq_len"], s["top_k"], s["greedy_prefix"], s["vocab_size"], s["bos_id"]) == (12, 50, 3, 128, 1)
    assert {"commit", "torch"} <= set(on_disk["run_metadata"]) and "distinct_2" in on_disk["diversity"]
    assert on_disk["calls"][-1]["tokens_generated"] == 60
    data = load_dataset(tmp_path)
    assert data.ids.dtype == torch.long and data.ids.shape == (5, 12) and data.has_logits
    assert (data.ids[:, 0] == 1).all() and not set(data.ids[:, 1].tolist()) & FakeTok().special_ids()


def test_ids_do_not_depend_on_batch_size(tiny, tmp_path):
    a = _gen(tiny, tmp_path / "a", batch_size=2, topk_logits=2)
    b = _gen(tiny, tmp_path / "b", batch_size=3, topk_logits=2)
    da, db = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert torch.equal(da.ids, db.ids)
    assert torch.allclose(da.logsumexp, db.logsumexp, atol=1e-4)
    assert a["diversity"] == b["diversity"]
    _gen(tiny, tmp_path / "c", seed=1)
    assert not torch.equal(load_dataset(tmp_path / "c").ids, da.ids)


def test_greedy_prefix_then_sampling_within_top_k(tiny, tmp_path):
    _gen(tiny, tmp_path, n_sequences=6, seq_len=16, greedy_prefix=3, top_k=3, topk_logits=3)
    d = load_dataset(tmp_path)
    with torch.no_grad():
        logits = tiny(d.ids).logits
    # positions 2..4 are greedy continuations of [BOS, first]
    assert torch.equal(d.ids[:, 2:5], logits[:, 1:4].argmax(-1))
    # every sampled token is among the 3 most likely (top_k=3) under the stored teacher top-3
    nxt = d.ids[:, 5:]
    assert (d.topk_indices[:, 4:-1].long() == nxt[..., None]).any(-1).all()


def test_topk_logits_match_a_teacher_reforward(tiny, tmp_path):
    _gen(tiny, tmp_path, n_sequences=3, seq_len=10, topk_logits=5)
    d = load_dataset(tmp_path)
    with torch.no_grad():
        logits = tiny(d.ids).logits.float()
    top = logits.topk(5, -1)
    assert torch.equal(d.topk_indices.long(), top.indices)
    assert torch.allclose(d.topk_values.float(), top.values, atol=2e-3, rtol=1e-3)
    assert torch.allclose(d.logsumexp, logits.logsumexp(-1), atol=1e-5)


def test_resume_after_interruption_equals_one_shot(tiny, tmp_path):
    one = tmp_path / "one"
    _gen(tiny, one, n_sequences=11, topk_logits=2)
    part = tmp_path / "part"
    _gen(tiny, part, n_sequences=4)  # "interrupted" after one full shard
    shard0 = (part / shard_name(0)).read_bytes()
    mtime = (part / shard_name(0)).stat().st_mtime_ns
    _gen(tiny, part, n_sequences=6, batch_size=3)  # short last shard ...
    meta = _gen(tiny, part, n_sequences=11, batch_size=1)  # ... completed, not regenerated
    assert (part / shard_name(0)).read_bytes() == shard0 and (part / shard_name(0)).stat().st_mtime_ns == mtime
    assert meta["n_sequences"] == 11 and len(meta["shards"]) == 3 and len(meta["calls"]) == 3
    assert torch.equal(load_dataset(part).ids, load_dataset(one).ids)
    assert _gen(tiny, part, n_sequences=2)["calls"][-1]["sequences_generated"] == 0  # folder holds more


def test_settings_mismatch_is_refused(tiny, tmp_path):
    _gen(tiny, tmp_path, n_sequences=2)
    with pytest.raises(ValueError, match=r"top_k: 50 there, 40 now.*new folder") as e:
        _gen(tiny, tmp_path, n_sequences=4, top_k=40)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model_fingerprint"):
        _gen(tiny_model("LlamaForCausalLM", seed=1), tmp_path, n_sequences=4)


def test_corrupt_shard_is_detected_then_regenerated(tiny, tmp_path):
    _gen(tiny, tmp_path)
    good = load_dataset(tmp_path).ids
    f = tmp_path / shard_name(0)
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        load_dataset(tmp_path)
    assert "\n" not in str(e.value)
    _gen(tiny, tmp_path)  # same settings: the bad shard is regenerated
    assert torch.equal(load_dataset(tmp_path).ids, good)


def test_bad_values_are_refused(tiny, tmp_path):
    for kw, msg in [(dict(top_p=0.0), "top_p"), (dict(n_sequences=0), "n_sequences"), (dict(seq_len=2), "seq_len"),
                    (dict(seq_len=1000), "context"), (dict(temperature=-1.0), "temperature"),
                    (dict(topk_logits=999), "topk_logits")]:
        with pytest.raises(ValueError, match=msg):
            _gen(tiny, tmp_path / "x", **kw)


def test_batches_are_shuffled_reproducibly(tiny, tmp_path):
    _gen(tiny, tmp_path, topk_logits=2)
    d = load_dataset(tmp_path)
    a = list(batches(d, 2, seed=0))
    assert [len(b["ids"]) for b in a] == [2, 2, 1] and a[0]["topk_indices"].dtype == torch.long
    assert all(torch.equal(x["ids"], y["ids"]) for x, y in zip(a, batches(d, 2, seed=0)))
    rows = torch.cat([b["ids"] for b in a])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, d.ids.tolist()))
    assert len(list(batches(d, 2, seed=0, drop_last=True))) == 2


def test_diversity_stats_exact_values():
    ids = torch.tensor([[1, 5, 5, 5, 6, 7, 8, 9, 4],
                        [1, 5, 5, 5, 6, 7, 8, 9, 3],
                        [1, 5, 5, 5, 6, 7, 8, 9, 4],
                        [1, 2, 3, 4, 2, 3, 4, 2, 2]])
    s = diversity_stats(ids)
    assert s["sequences"] == 4 and s["tokens"] == 36
    assert s["distinct_1"] == 9 / 36  # ids 1..9
    # bigrams: rows 0-2 share 6 ((5,5) twice) + {(9,4), (9,3)}; row 3 adds (1,2), (2,3), (3,4), (4,2), (2,2)
    assert s["distinct_2"] == (6 + 2 + 5) / 32
    # 4-grams: rows 0-2: 1555 5556 5567 5678 6789 + {7894, 7893}; row 3: 1234 2342
    # 3423 4234 (2342 again) 3422
    assert s["distinct_4"] == (5 + 2 + 5) / 24
    assert s["duplicate_sequences"] == 1
    assert s["prefix8_repeat_share"] == 2 / 4
    assert s["mean_longest_run"] == (3 + 3 + 3 + 2) / 4
    short = diversity_stats(torch.tensor([[3, 3]]), n=(1, 3))
    assert short["distinct_1"] == 0.5 and short["distinct_3"] is None and short["mean_longest_run"] == 2.0


def test_dedup_keeps_first_occurrences(tmp_path, tiny):
    _gen(tiny, tmp_path, temperature=0.0, n_sequences=8, seq_len=4)  # greedy: repeats when first tokens repeat
    full, dd = load_dataset(tmp_path), load_dataset(tmp_path, dedup=True)
    assert len(dd) == len(full) - diversity_stats(full.ids)["duplicate_sequences"]
    assert len({tuple(r) for r in dd.ids.tolist()}) == len(dd)


@needs_shared
def test_stories260k_random_first_tokens_do_not_collapse(stories, tmp_path):
    model, tok = stories
    meta = generate_dataset(model, tok, tmp_path, n_sequences=16, seq_len=24, batch_size=16, progress=False)
    ids = load_dataset(tmp_path).ids
    assert (ids[:, 0] == tok.bos_id).all()
    assert ids[:, 1].unique().numel() >= 12  # 16 uniform draws from ~500 ids
    assert not set(ids[:, 1].tolist()) & tok.special_ids()
    assert meta["diversity"]["prefix8_repeat_share"] < 0.25 and meta["diversity"]["duplicate_sequences"] == 0
    assert meta["eos"]["eos_id"] == tok.eos_id


@needs_shared
def test_cli_round_trip_and_errors(tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "data"
    args = ["-q", "gen-data", "stories260k", "--out", str(out), "--n-sequences", "6", "--seq-len", "16",
            "--batch-size", "4", "--shard-size", "4", "--topk-logits", "4", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 sequences" in printed and "distinct_2" in printed
    d = load_dataset(out)
    assert d.ids.shape == (6, 16) and d.topk_values.shape == (6, 16, 4)
    assert d.meta["model"] == "stories260k" and len(d.meta["shards"]) == 2
    assert main(args) == 0 and "generated 0 now" in capsys.readouterr().out  # resume: nothing left to do
    for bad in (["--top-p", "1.5"], ["--n-sequences", "0"], ["--top-k", "40"]):
        assert main(args + bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lowbit: error: ") and "\n" not in err
    assert main(["gen-data", str(tmp_path / "nope"), "--out", str(out), "--n-sequences", "1", "--seq-len", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: model not found") and "\n" not in err
