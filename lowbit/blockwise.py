"""The block-by-block loop that GPTQ, AWQ, OmniQuant and tiled QAT share; no tracing.

1. :func:`capture_inputs` runs the model on calibration batches until the first decoder block and
   records what that block receives: the hidden states of each batch and the keyword arguments
   (attention mask, position embeddings, ...), which depend only on the batch shape.
2. :func:`for_each_block` visits the blocks in order. For block ``i`` it calls
   ``fn(i, block, inputs, kwargs)`` (which may change the block, e.g. quantize it), then feeds the inputs
   through the (changed) block to get the next block's inputs. Only the current block is moved to
   ``device``; the others stay where they are. So a quantized prefix feeds the next block, as in
   GPTQ's ``llama_sequential``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .models import arch_of, blocks, get_module

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], dict]:
    """Hidden states entering the first decoder block for each batch of ids, and its kwargs."""
    first = blocks(model)[0]
    hidden: list[Tensor] = []
    kwargs: dict = {}

    def hook(mod, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return hidden, kwargs


@torch.no_grad()
def inputs_reaching(block: nn.Module, module: nn.Module, xs: list[Tensor], kwargs: dict,
                    consume: Callable[[Tensor], None]) -> None:
    """Run ``block`` on each of ``xs`` only as far as ``module``: ``consume`` receives the input that
    ``module`` would get, then the rest of the block is skipped. For the Hessian solvers' sequential
    groups this saves the layers after the group (e.g. the whole MLP when the group is ``o_proj``)."""
    def hook(mod, args, kw):
        consume((args[0] if args else next(iter(kw.values()))).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in xs:
            try:
                run_block(block, x, kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()


class AttentionCache:
    """Skip recomputing attention once its input projections are final.

    In a block whose q/k/v projections are frozen, the attention module's output on a fixed input is
    ``o_proj(core)`` with ``core`` (softmax(QK^T)V, heads merged) fixed too; only ``o_proj`` may still change.
    :meth:`record` keeps ``core`` for each input as it reaches ``o_proj`` (before ``o_proj``'s own pre-hooks,
    e.g. QuaRot's online rotation), and inside :meth:`replay` the attention module returns ``o_proj(core)``
    for its ``j``-th call of the pass instead of recomputing q, k, v and the scores. The first replayed
    call also runs the real attention and compares: an architecture that does more after ``o_proj`` is
    caught there and the cache turns itself off. Costs one ``core`` tensor per input (the size of the
    hidden states)."""

    def __init__(self, block: nn.Module, out_proj: str):
        self.attn = block.get_submodule(out_proj.rpartition(".")[0])
        self.out = block.get_submodule(out_proj)
        self.cores: list[Tensor] = []
        self.rest: tuple | None = None  # what the attention module returns beside its output (None: a tensor)
        self.ok: bool | None = None  # None: not checked yet

    def ready(self, n: int) -> bool:
        return self.ok is not False and len(self.cores) == n

    @contextmanager
    def record(self):
        self.cores.clear()
        handle = self.out.register_forward_pre_hook(lambda m, args: self.cores.append(args[0].detach()),
                                                    prepend=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def replay(self):
        real, calls = self.attn.forward, [0]

        def forward(*args, **kwargs):
            j = calls[0]
            calls[0] += 1
            if self.ok is None:  # the first replay: check it against the real attention
                ref = real(*args, **kwargs)
                ref0 = ref[0] if isinstance(ref, tuple) else ref
                self.rest = tuple(ref[1:]) if isinstance(ref, tuple) else None
                self.ok = bool(torch.equal(ref0, self.out(self.cores[j])))
                if not self.ok:
                    log.warning("attention cache off: %s does more than o_proj(core) here",
                                type(self.attn).__name__)
                return ref
            if not self.ok:
                return real(*args, **kwargs)
            y = self.out(self.cores[j])
            return y if self.rest is None else (y, *self.rest)

        patched = self.attn.__dict__.get("forward")  # an instance-level forward someone set: put it back after
        self.attn.forward = forward
        try:
            yield
        finally:
            if patched is not None:
                self.attn.forward = patched
            else:
                del self.attn.forward


def run_block(block: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    """One decoder block's output hidden states (blocks return a tensor or a tuple)."""
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def for_each_block(model: nn.Module, inputs: list[Tensor], kwargs: dict,
                   fn: Callable[[int, nn.Module, list[Tensor], dict], dict | None] | None = None,
                   device: torch.device | str | None = None,
                   report: Callable[[int, float, float], None] | None = None, probe: int = 4,
                   on_restore: Callable[[int, dict], None] | None = None) -> list[Tensor]:
    """Visit every block in order (see the module docstring); returns the last block's outputs.

    ``report(i, rel_err, seconds)``, if given, receives each block's reconstruction error
    ``||B_q(x) - B(x)||^2 / ||B(x)||^2`` on its first ``probe`` inputs (``B`` the block before ``fn``,
    ``B_q`` after, same inputs) and the time ``fn`` took.

    With an active :mod:`lowbit.blockckpt` checkpoint each finished block is saved, and the blocks a
    killed run finished are restored instead of recomputed. ``fn`` may return a dict: ``outputs``, the
    changed block's outputs on ``inputs`` if ``fn`` computed them (saves a forward), and scalars kept
    with the block, its lists of tensors (state the method carries to the next block) with the latest block
    only; ``on_restore(i, info)`` gives them back for each restored block (the carried tensors with the last
    one), so that the method's own state and progress bar catch up."""
    from . import blockckpt

    ck = blockckpt.take()
    todo = list(enumerate(blocks(model)))
    if ck is not None and ck.done:
        n = min(ck.done, len(todo))
        for i, block in todo[:n]:
            info = ck.restore(i, block)
            if i == n - 1:  # the hidden states entering block n, and the method's carried tensors
                inputs, carried = ck.carry(inputs[0].device if inputs else "cpu")
                info |= carried
            if report is not None:
                report(i, info.get("rel_err", float("nan")), info.get("seconds", 0.0))
            if on_restore is not None:
                on_restore(i, info)
        todo = todo[n:]
    for i, block in todo:
        home = next(block.parameters()).device
        dev = torch.device(device) if device is not None else home
        block.to(dev)
        xs = [x.to(dev) for x in inputs]
        kw = {k: _to(v, dev) for k, v in kwargs.items()}
        t_block = time.time()
        ref = [run_block(block, x, kw) for x in xs[:probe]] if report is not None else []
        t0 = time.time()
        info = (fn(i, block, xs, kw) if fn is not None else None) or {}
        seconds = time.time() - t0
        outputs = info.pop("outputs", None)  # fn may have computed the changed block's outputs already
        with torch.no_grad():
            inputs = outputs if outputs is not None else [run_block(block, x, kw) for x in xs]
        err = float("nan")
        if report is not None:
            num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(inputs, ref))
            den = sum(float(r.float().pow(2).sum()) for r in ref)
            err = num / max(den, 1e-30)
            report(i, err, seconds)
        block.to(home)
        if ck is not None:
            # wall_s: the block's whole time (fn, its output pass, the error probe), what a resumed run does not redo
            ck.save(i, block, inputs, {"rel_err": err, "seconds": seconds, "wall_s": time.time() - t_block} | info)
    return inputs


def _to(v, dev):
    if isinstance(v, Tensor):
        return v.to(dev)
    if isinstance(v, tuple):
        return tuple(_to(t, dev) for t in v)
    return v


@torch.no_grad()
def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """Final norm and output head applied to the last block's output."""
    arch = arch_of(model)
    h = get_module(model, arch.final_norm)(hidden)
    proj = getattr(getattr(model, "model", None), "decoder", None)
    if proj is not None and getattr(proj, "project_out", None) is not None:  # OPT-350m style
        h = proj.project_out(h)
    logits = get_module(model, arch.head)(h)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2
        logits = torch.tanh(logits / softcap) * softcap
    return logits
