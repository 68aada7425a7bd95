"""Checkpoints of the block-by-block PTQ loop, so that a killed GPTQ / AWQ / SmoothQuant / OmniQuant / SpQR
run continues at the block where it stopped.

:func:`lowbit.quantize.quantize_model` (``ckpt=<folder>``, CLI ``--ckpt``) opens one :class:`BlockCheckpoint`
per recipe step (``<folder>/<k>-<step>``) and makes it *active*; the step's :func:`lowbit.blockwise.for_each_block`
takes it and, after each block, writes

* ``block-<i>.safetensors``: the block's parameters and buffers (quantized weights, qparams, folded scales,
  SpQR outliers) and the names of its frozen Linears;
* ``carry.safetensors``: what the next block needs, i.e. the hidden states it receives and any tensors the
  method carries from block to block (OmniQuant's float-model stream), plus the RNG state. Only the latest is
  kept;
* ``state.json`` last (the commit point): the run key, the blocks done with each block's error, seconds and
  whatever small figures the method returned.

A rerun with the same folder restores the finished blocks from their files, takes the hidden states from
``carry.safetensors`` (no forward through the restored prefix) and goes on: the result is bit-identical to an
uninterrupted run on the same device. The key hashes the config, the float model, the calibration ids and the
recipe step, so a folder of another run is refused with a one-line error. The folder holds about one float
copy of the decoder blocks plus one set of calibration hidden states.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed

FORMAT = "lowbit-ptq-blocks-1"
STATE = "state.json"
CARRY = "carry.safetensors"

_ACTIVE: ContextVar["BlockCheckpoint | None"] = ContextVar("lowbit_block_ckpt", default=None)


class BlockCheckpoint:
    """The checkpoint folder of one block loop (see the module docstring)."""

    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key
        self.meta: dict = {"format": FORMAT, "key": key, "blocks": []}
        state = self.folder / STATE
        if state.is_file():
            try:
                meta = json.loads(state.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"PTQ checkpoint {state} is not valid JSON; delete {self.folder}") from None
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError(f"PTQ checkpoint folder {self.folder} holds another run (different config, float "
                                 "model, calibration data or lowbit version); use a new --ckpt folder or delete it")
            self.meta = meta
        self.restored = 0  # blocks this run took from the folder

    @property
    def done(self) -> int:
        """Blocks finished and saved."""
        return len(self.meta["blocks"])

    def _read(self, name: str) -> dict[str, Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.folder / name))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"PTQ checkpoint file {self.folder / name} is missing or corrupt "
                             f"({str(e).splitlines()[0]}); delete {self.folder} and rerun") from None

    def _write(self, name: str, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.folder / name)

    def save(self, i: int, block: nn.Module, next_inputs: list[Tensor], info: dict) -> None:
        """Block ``i`` is finished: its state, the next block's inputs and the method's carried tensors."""
        from .results import write_json

        if i != self.done:
            raise RuntimeError(f"PTQ checkpoint: block {i} saved after {self.done} blocks")
        tensors = {k: v for k, v in block.state_dict().items()}
        frozen = [n for n, m in block.named_modules() if getattr(m, "frozen", False)]
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()):
            raise ValueError(f"PTQ: block {i} holds non-finite weights after quantization; not checkpointed")
        if not distributed.is_main():  # several processes computed the same block: rank 0 writes it
            self.meta["blocks"].append({"index": i})
            return
        self._write(f"block-{i}.safetensors", tensors)
        carry = {f"x.{j}": x for j, x in enumerate(next_inputs)}
        scalars = {}
        for k, v in info.items():
            if isinstance(v, (list, tuple)) and v and all(isinstance(t, Tensor) for t in v):
                carry |= {f"c.{k}.{j}": t for j, t in enumerate(v)}
            else:
                scalars[k] = v
        carry["rng"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            carry["rng_cuda"] = torch.cuda.get_rng_state()
        self._write(CARRY, carry)
        self.meta["blocks"].append({"index": i, "frozen": frozen, **scalars})
        write_json(self.folder / STATE, self.meta)

    @torch.no_grad()
    def restore(self, i: int, block: nn.Module) -> dict:
        """Load block ``i``'s saved state into ``block`` (in place, on its device); returns its recorded info."""
        entry = self.meta["blocks"][i]
        tensors = self._read(f"block-{i}.safetensors")
        mods = dict(block.named_modules())
        for key, t in tensors.items():
            name, _, attr = key.rpartition(".")
            m = mods.get(name)
            if m is None:
                raise ValueError(f"PTQ checkpoint {self.folder}: block {i} has {key}, which this model lacks; "
                                 "delete the folder and rerun")
            if attr in m._parameters:
                p = m._parameters[attr]
                if p is None:  # a method that added a bias (e.g. a folded shift)
                    m._parameters[attr] = nn.Parameter(t.to(self._device(block)), requires_grad=False)
                else:
                    p.copy_(t.to(p))
            else:  # buffers, including qparams that are None before quantization
                setattr(m, attr, t.to(self._device(block)))
        for name in entry["frozen"]:
            mods[name].frozen = True
        self.restored += 1
        return {k: v for k, v in entry.items() if k not in ("index", "frozen")}

    def carry(self, device) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """The saved inputs of the next block and the method's carried tensors; sets the RNG state back."""
        t = self._read(CARRY)
        torch.set_rng_state(t.pop("rng"))
        rng_cuda = t.pop("rng_cuda", None)
        if rng_cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_cuda)
        xs = [t[f"x.{j}"].to(device) for j in range(sum(k.startswith("x.") for k in t))]
        extra: dict[str, list[Tensor]] = {}
        for k in sorted((k for k in t if k.startswith("c.")), key=lambda k: int(k.rsplit(".", 1)[1])):
            extra.setdefault(k[2:].rsplit(".", 1)[0], []).append(t[k].to(device))
        return xs, extra

    @staticmethod
    def _device(block: nn.Module):
        return next(block.parameters()).device


def check_folder(folder: str | Path, what: str = "--ckpt") -> Path:
    """Create the checkpoint folder now (before any work) or fail in one line: a file in the way, no permission."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder: name a folder for the checkpoints")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be created ({e.strerror}): name a writable folder") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} is not writable: name a writable folder")
    return path


def run_key(cfg_dict: dict, fingerprint: str, calib: Tensor | None, step: str) -> str:
    """What a checkpoint must share with the run that resumes it."""
    from . import __version__

    h = hashlib.sha256(json.dumps({"config": cfg_dict, "step": step, "version": __version__},
                                  sort_keys=True, default=str).encode())
    h.update(fingerprint.encode())
    if calib is not None:
        h.update(calib.detach().cpu().contiguous().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def active(ckpt: BlockCheckpoint | None):
    """Make ``ckpt`` the checkpoint the next :func:`lowbit.blockwise.for_each_block` uses."""
    token = _ACTIVE.set(ckpt)
    try:
        yield ckpt
    finally:
        _ACTIVE.reset(token)


def take() -> BlockCheckpoint | None:
    """The active checkpoint, handed to one block loop only (a second loop in the same step gets None)."""
    ck = _ACTIVE.get()
    _ACTIVE.set(None)
    return ck
