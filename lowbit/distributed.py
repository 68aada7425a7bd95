"""Data-parallel runs under ``torchrun``: process-group set-up and the few collectives lowbit needs.

``torchrun --nproc_per_node N -m lowbit quantize ...`` (or ``... gen-data ...``) starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`init` joins them into one process group when ``WORLD_SIZE > 1``: backend ``gloo`` on CPU, ``nccl``
on CUDA with one GPU per process (``cuda:LOCAL_RANK``). In a single process (the default) nothing is set
up and every helper here is a no-op: ``rank() == 0``, ``world_size() == 1``, ``is_main()`` is true, gathers
return their input. A process group made by the caller (any backend) is used as it is.

Who does what (:mod:`lowbit.datafree`, :mod:`lowbit.calib`, :mod:`lowbit.dfqat`): work is split by
:func:`share` into contiguous, disjoint parts, one per rank, and put back together in rank order with
:func:`all_gather_cat`, so a multi-process result is the single-process one; only rank 0 writes files and
shows progress bars.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

_OWNED = False  # this module made the process group (so cleanup() destroys it)


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank())) if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str | None = None) -> str | None:
    """Join torchrun's process group when ``WORLD_SIZE > 1`` (a no-op otherwise, or when a group exists).

    ``device`` is the device the command asked for (``cpu``, ``cuda``, ``cuda:1``, None): a CUDA device becomes
    ``cuda:LOCAL_RANK`` and the backend ``nccl``; anything else uses ``gloo``. Returns the device this process
    should use (``device`` itself in a single process). ``LOWBIT_DIST_TIMEOUT`` (seconds, default 7200) bounds
    how long a process waits for the others, e.g. while rank 0 alone evaluates."""
    global _OWNED
    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if n <= 1 or dist.is_initialized():  # a single process, or the caller's group: used as it is
        return device
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    timeout = datetime.timedelta(seconds=float(os.environ.get("LOWBIT_DIST_TIMEOUT", "7200")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    _OWNED = True
    return device


def cleanup() -> None:
    """Destroy the process group if :func:`init` made it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    if active():
        dist.barrier()


def share(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank ``r``'s contiguous part of ``range(n)`` (sizes differ by at most one; earlier ranks get more)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    q, m = divmod(n, w)
    start = r * q + min(r, m)
    return range(start, start + q + (r < m))


def rng_unchanged(device: torch.device | str | None = None):
    """A context that leaves the random state as it found it (CPU, and ``device`` if it is a GPU) in a process
    group: work split unequally between the processes (e.g. a learner that draws noise in a no-grad pass)
    then cannot put their random streams out of step. A no-op in a single process."""
    if not active():
        return contextlib.nullcontext()
    device = torch.device(device) if device is not None else None
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def _comm_device(t: Tensor) -> torch.device:
    """Where a tensor must be for a collective: the current GPU with NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device; ``t`` itself in a single process)."""
    if not active():
        return t
    buf = t.detach().to(_comm_device(t), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def mean_value(x: float) -> float:
    """The mean of a Python float over all ranks, in float64 (NaN anywhere gives NaN everywhere)."""
    if not active():
        return x
    return float(all_reduce_sum(torch.tensor([x], dtype=torch.float64))) / world_size()


def any_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not active():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)) > 0)


def all_gather_object(obj) -> list:
    """Every rank's (picklable) ``obj``, in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(t: Tensor) -> Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order; their dim-0 sizes may differ (0 too), the
    other dimensions and the dtype must agree. The result is on ``t``'s device."""
    if not active():
        return t
    dev = _comm_device(t)
    sizes = [int(s) for s in all_gather_object(int(t.shape[0]))]
    big = max(sizes)
    pad = torch.zeros((big, *t.shape[1:]), dtype=t.dtype, device=dev)
    pad[:t.shape[0]] = t.detach().to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


__all__ = ["active", "rank", "world_size", "local_rank", "is_main", "init", "cleanup", "barrier", "share",
           "all_reduce_sum", "mean_value", "any_true", "all_gather_object", "broadcast_object", "all_gather_cat",
           "rng_unchanged"]
