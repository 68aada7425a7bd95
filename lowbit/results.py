"""Result records: one JSON object per run with everything needed to trust and rerun it."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import __version__


def git_commit() -> str:
    """The commit of the lowbit checkout (``+dirty`` when its code has uncommitted changes).
    ``LOWBIT_COMMIT`` names it for copies of a checkout without ``.git`` (e.g. a GPU machine)."""
    if os.environ.get("LOWBIT_COMMIT"):
        return os.environ["LOWBIT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # result files and documents are data, not code: they do not make a run dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!results", ":!*.md"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def reset_peak_memory(device: str | torch.device | None = None) -> bool:
    """Start a new peak for :func:`peak_memory_mb` (so a run of several rows in one process measures each
    row alone): the CUDA allocator's peak on a GPU; on Linux the resident-set high-water mark (writing 5 to
    ``/proc/self/clear_refs``). Returns False where the CPU peak cannot be reset."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: str | torch.device | None = None) -> float:
    """Peak memory since the last :func:`reset_peak_memory` (else since the process started): CUDA allocator
    peak on a GPU, else the resident-set high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_metadata() -> dict:
    return {"commit": git_commit(), "lowbit": __version__, "torch": torch.__version__,
            "python": sys.version.split()[0], "device": device_name(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


def write_json(path: str | Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table of ``rows`` (dicts) restricted to ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
