"""Data-parallel runs (lowbit.distributed): 2 CPU processes (gloo, set up from torchrun's environment variables)
give the single-process result for ``gen-data`` and for ``quantize --method dfqat``; one process sets up
nothing."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from conftest import needs_shared
from lowbit import distributed

GEN = ["gen-data", "stories260k", "--n-sequences", "10", "--seq-len", "40", "--batch-size", "4", "--shard-size", "6",
       "--topk-logits", "4", "--device", "cpu"]
# 2 tiles (blocks 0-2, 3-4) x 4 steps of 4 sequences (2 per process), then 3 end-to-end steps of 3 sequences
# (shares of 2 and 1: unequal), a checkpoint every 2 steps; 8 self-generated sequences of 48 ids
QUANT = ["quantize", "stories260k", "--method", "dfqat", "--w-format", "int3", "--w-granularity", "g32",
         "--nsamples", "8", "--calib-seqlen", "48", "--device", "cpu", "--save-dtype", "float32",
         "--opt", "dfqat_tile_steps=4", "--opt", "dfqat_e2e_steps=3", "--opt", "dfqat_batch=4",
         "--opt", "dfqat_e2e_batch=3", "--opt", "dfqat_save_every=2",
         # learning rates pinned (not the defaults): with much larger steps one LSQ code flipped by float
         # rounding moves the next loss by more than the comparison's tolerance
         "--opt", "dfqat_lr=3e-4", "--opt", "dfqat_q_lr=1e-4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(root) -> list[list[str]]:
    """gen-data; dfqat with a checkpoint folder; the same again (resumes from the finished checkpoint: nothing
    trains); a batch smaller than the number of processes (refused with one line on every rank)."""
    q = QUANT + ["--opt", f"dfqat_ckpt={root}/ck", "--json", f"{root}/q.json", "--out", f"{root}/q"]
    return [["-q", *GEN, "--out", f"{root}/gen"], ["-q", *q], ["-q", *q[:-4], "--json", f"{root}/again.json"],
            ["-q", *QUANT, "--nsamples", "2", "--calib-seqlen", "8", "--opt", "dfqat_batch=1"]]


def _worker(rank: int, root: str, ports: list[int]) -> None:
    """One of the 2 processes: what torchrun would set, then the CLI (one process group per command)."""
    torch.set_num_threads(1)
    from lowbit.cli import main

    codes = []
    for argv, port in zip(_commands(root), ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2")
        codes.append(main(argv))
        assert not torch.distributed.is_initialized()  # main() leaves no process group behind
    with open(f"{root}/codes{rank}.json", "w") as f:
        json.dump(codes, f)
    # the Python API in the same process group; the tile loss of rank 1 alone turns NaN once (its 3rd call)
    import lowbit
    import lowbit.dfqat as dfqat
    from lowbit.config import QuantConfig, parse_spec

    os.environ["MASTER_PORT"] = str(ports[-1])
    distributed.init("cpu")
    assert distributed.world_size() == 2 and distributed.rank() == rank
    state = torch.get_rng_state()
    with distributed.rng_unchanged("cpu"):  # unequal work per rank leaves the random streams in step
        torch.rand(3 + rank)
    assert torch.equal(torch.get_rng_state(), state)
    real, calls = dfqat._tile_loss, []

    def flaky(out, target, kind):
        calls.append(1)
        loss = real(out, target, kind)
        return loss * float("nan") if rank == 1 and len(calls) == 3 else loss

    dfqat._tile_loss = flaky
    model, _ = lowbit.load_model("stories260k")
    ids = torch.randint(3, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize_model(model, QuantConfig(weight=parse_spec("int3", "g32"), method="dfqat", extra={
        "dfqat_tile_steps": 4, "dfqat_e2e_steps": 2, "dfqat_batch": 4}), calib=ids, progress=False)
    rep = q.dfqat_report
    torch.save({"tiles": [(t["retries"], t["lr"], t["losses"]) for t in rep["tiles"]], "e2e": rep["e2e"]["losses"],
                "state": q.state_dict()}, f"{root}/api{rank}.pt")
    distributed.cleanup()


def _state(folder):
    from lowbit.export import load_quantized

    model, _ = load_quantized(folder)
    return model.state_dict()


@needs_shared
def test_two_processes_give_the_one_process_result(tmp_path):
    from lowbit.cli import main
    from lowbit.datafree import load_dataset

    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    ctx = torch.multiprocessing.start_processes(_worker, args=(str(multi), [_free_port() for _ in range(5)]),
                                                nprocs=2, join=False, start_method="fork")
    try:
        for argv in _commands(single)[:2]:  # the reference, meanwhile, in this process (no process group)
            assert main(argv) == 0
        deadline = time.time() + 300
        while not ctx.join(timeout=2):
            assert time.time() < deadline, "the 2 processes did not finish in 300 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for r in (0, 1):
        assert json.loads((multi / f"codes{r}.json").read_text()) == [0, 0, 0, 2]

    # gen-data: the same ids (bit for bit), the same shards, teacher top-k equal up to float rounding
    a, b = load_dataset(single / "gen"), load_dataset(multi / "gen")
    assert torch.equal(a.ids, b.ids) and a.ids.shape == (10, 40)
    assert [e["n"] for e in b.meta["shards"]] == [6, 4] and b.meta["calls"][-1]["processes"] == 2
    assert a.meta["calls"][-1]["processes"] == 1 and a.meta["diversity"] == b.meta["diversity"]
    assert torch.equal(a.topk_indices, b.topk_indices)
    assert torch.allclose(a.topk_values.float(), b.topk_values.float(), atol=1e-2)
    assert torch.allclose(a.logsumexp, b.logsumexp, atol=1e-5)

    # dfqat: the same self-generated data, loss curves and trained weights
    ra, rb = (json.loads((d / "q.json").read_text()) for d in (single, multi))
    assert ra["calibration"] == rb["calibration"]
    ta, tb = ra["dfqat_report"], rb["dfqat_report"]
    for x, y in zip(ta["tiles"] + [ta["e2e"]], tb["tiles"] + [tb["e2e"]]):
        assert len(x["losses"]) == len(y["losses"]) > 0
        assert x["losses"] == pytest.approx(y["losses"], rel=1e-4)
    assert ta["tiles"][0]["rel_mse_before"] == tb["tiles"][0]["rel_mse_before"]  # no-grad passes: bit for bit
    sa, sb = _state(single / "q"), _state(multi / "q")
    assert sa.keys() == sb.keys()
    for k in sa:  # learned scales are stored in fp16: a summation-order difference may move one by an fp16 ulp
        # (2^-11 to 2^-10 relative), and the weights of its group with it; anything wrong is far larger
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5, rtol=1e-3), k
    # rank 0 alone wrote the checkpoint; the re-run resumed from it on both ranks and trained nothing
    again = json.loads((multi / "again.json").read_text())["dfqat_report"]
    assert [t["resumed"] for t in again["tiles"]] == [True, True] and again["e2e"]["resumed_at"] == 3
    assert again["e2e"]["losses"] == tb["e2e"]["losses"]
    # the divergence guard decided alike on both ranks: tile 1 went back once (learning rates halved), both
    # processes hold the same weights and the same report
    api = [torch.load(multi / f"api{r}.pt") for r in (0, 1)]
    assert [t[0] for t in api[0]["tiles"]] == [1, 0] and api[0]["tiles"] == api[1]["tiles"]
    assert api[0]["tiles"][0][1] == api[0]["tiles"][1][1] / 2 and api[0]["e2e"] == api[1]["e2e"]
    assert all(torch.equal(v, api[1]["state"][k]) for k, v in api[0]["state"].items())


def test_one_process_sets_up_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") == "cpu" and not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init("cuda") == "cuda" and not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.arange(6.0).view(3, 2)
    assert distributed.all_gather_cat(t) is t and distributed.all_reduce_sum(t) is t
    assert distributed.mean_value(2.5) == 2.5 and distributed.any_true(False) is False
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(7) == 7
    assert distributed.share(5) == range(5)
    state = torch.get_rng_state()
    with distributed.rng_unchanged("cpu"):  # nothing forked: the random stream goes on as before
        torch.rand(3)
    assert not torch.equal(torch.get_rng_state(), state)
    distributed.barrier()
    distributed.cleanup()


@pytest.mark.parametrize("n, w", [(0, 2), (1, 2), (7, 2), (7, 3), (12, 4), (3, 5)])
def test_shares_are_contiguous_disjoint_and_cover_everything(n, w):
    parts = [distributed.share(n, r, w) for r in range(w)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)  # earlier ranks get more
