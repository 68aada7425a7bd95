"""Data-free QAT (issue 4, Stages 2 and 3): forward tiled QAT, then end-to-end distillation.

``--method dfqat``. The student is the model with live :class:`~lowbit.qmodules.QuantLinear` modules that
:func:`lowbit.quantize.quantize_model` made (sharing the float weights); the teacher is a frozen copy of
the float model taken when the method starts (every quantizer of the copy switched off, so an online input
rotation of a preceding transform such as QuaRot is kept). Every live Linear gets a learnable weight
quantizer (:func:`lowbit.learnable.attach_learnable`, kind ``dfqat_quantizer``, LSQ by default: a fresh
LSQ is exactly RTN, so training starts from the PTQ baseline). Activation (``cfg.act``) and KV-cache
(``cfg.kv``, the key/value projections' outputs) quantizers stay what they are at inference, dynamic min-max
fake quantization, in every training forward, with the straight-through gradient (LLM-QAT's W4A8KV4); the
Linears whose outputs are KV-quantized train like the others.

**Data.** ``calib`` (the token ids ``(n, seqlen)`` that ``quantize_model`` passes on) *is* the training
set. The CLI passes ``--calib self`` by default for dfqat: sequences the float model writes itself, no data
at all (:func:`lowbit.calib.self_generated_batches`); real text (``--calib tinystories``, ``c4``, a file) is
the ablation. ``dfqat_data=<folder>`` (written by :func:`lowbit.datafree.generate_dataset`) takes
precedence over ``calib``: its ids are the training set and, with ``dfqat_teacher=topk``, its stored top-K
teacher logits replace the teacher's forward pass in the end-to-end stage.

**Stage 3, forward tiled QAT** (METHODS.md 7.3 Block-AP, 7.5). The decoder blocks are cut into tiles of
``dfqat_tile`` consecutive blocks from the input side. The first block's inputs are captured once for all
training sequences. For each tile in turn:

* target ``Y``: the *float* tile's outputs, computed once and cached for every sequence, on the float
  chain's inputs (``dfqat_tile_input=fp``, the float model's own hidden states, so each tile is pulled back
  to the float trajectory) or on the quantized prefix's outputs (``quant``, plain local reconstruction);
* student input ``X_q``: the outputs of the already-trained (quantized) prefix, so the error the prefix
  makes is seen and compensated;
* ``dfqat_tile_steps`` AdamW steps on random batches of ``dfqat_batch`` sequences train the tile's Linear
  weights (lr ``dfqat_lr``) and its quantizers' parameters (lr ``dfqat_q_lr``), weight decay 0, cosine decay
  to ``dfqat_min_lr`` times the learning rate, on the loss
  ``hidden_loss(tile_q(X_q), Y, l1|l2, normalize=True)`` (:func:`lowbit.distill.hidden_loss`: mean absolute
  (default) or squared error relative to the target's, dimensionless and comparable across tiles);
* then ``X_q <- tile_q(X_q)`` (and ``X_fp <- Y``). Only the current tile trains; everything stays on the
  model's device. When no end-to-end stage follows, the tile is frozen on its quantizers' exact grid right
  away; otherwise the quantizers stay live (the forward of a live learnable quantizer equals its frozen
  weight bit for bit, so later tiles see exactly the frozen prefix) and the one final freeze comes at the end.

**Stage 2, end to end** (``dfqat_e2e_steps`` > 0): every live weight and quantizer parameter of the whole
model is distilled from the float teacher on the same sequences: ``kd_loss(student_logits, teacher_logits,
dfqat_kd, dfqat_kd_temp)`` (:func:`lowbit.distill.kd_loss`, forward KL, token mean), AdamW (``dfqat_e2e_lr``,
``dfqat_e2e_q_lr``, weight decay 0), cosine decay, gradient clipping at ``dfqat_clip``. Embeddings, norms and
the head stay as they are (embedding/head quantization, if asked, is applied after the method).
At the end every Linear is frozen on its learned grid (:func:`lowbit.learnable.freeze_learnable`).

**Robustness.** A NaN/inf loss or gradient, or a loss above 10x the median of the last 50 losses, restores
the last good state (the tile's start; in the end-to-end stage the last snapshot, taken every
``dfqat_save_every`` steps), halves the learning rates and retries, at most ``dfqat_retries`` times per
stage, then stops with a one-line ``ValueError``. Parameters are checked to be finite before any freeze or
checkpoint.

**Checkpoints** (``dfqat_ckpt=<folder>``): after every tile and every ``dfqat_save_every`` end-to-end steps,
``state.json`` (format, a key of the config + float model + training ids, tiles done, end-to-end step,
learning-rate factor, retries, the report so far) and one ``ckpt-*.safetensors`` (every block Linear's
weight, its quantizer's state, frozen qparams; the end-to-end optimizer's moments). Both are written
atomically, tensors first. A re-run with the same key resumes: finished tiles are loaded, not retrained, and
the end-to-end stage continues at its step; a folder from another config is a one-line error. Batches are a
pure function of ``(seed, stage, step)`` (no RNG state to save), so a resumed run gives the uninterrupted
run's result on CPU, and the same command gives the same weights.

**Multiple processes** (``torchrun --nproc_per_node N -m lowbit quantize ... --method dfqat``, or any process
group, :mod:`lowbit.distributed`): data parallel with DistributedDataParallel, the same global batch as one
process. Every process holds the whole model, the teacher and all training ids (the ids are checked to be equal
across processes); each step's batch is cut into contiguous shares, one per process (each needs at least one
sequence: ``dfqat_batch`` and ``dfqat_e2e_batch`` >= N); DDP wraps a module that computes the share's loss
with the tile's blocks (tiled stage) or the whole model (end to end) and averages the gradients of the trained
weights and of the learnable quantizers (submodules of their Linears). Each share's loss is weighted so that
the average is the whole batch's loss (its size; for the tiled loss also the whole batch's target scale), so N
processes give the single-process result up to float rounding. The no-grad passes (targets, propagation,
errors) are split by chunks and gathered. The divergence guard decides on the loss averaged over the processes
(and on any process's non-finite gradient or weights), so all go back together. Only rank 0 writes
checkpoints and shows progress bars; all resume from the same checkpoint.

A summary (per tile and end to end: losses per step, relative error before/after, seconds, steps, learning
rates, retries) is left in ``model.dfqat_report``.

**Measured** on stories260K (CPU, 1 thread; 128 x 256 self-generated ids; BENCHMARKS.md, "data-free QAT
ablations"): TinyStories held-out perplexity (all 293 windows of 512) int3 g32: float 4.27, RTN 7.54, GPTQ on the
same generated text 5.99, dfqat 5.04; int2 g32: RTN 363, GPTQ 115, dfqat 9.74; dfqat took 1.8-2.7x GPTQ's wall
time in the same run (25-50 s; two runs). The defaults were cut from v1 (2 tiles x 250 steps at ``dfqat_lr``
3e-4 and ``dfqat_q_lr`` 1e-4, then 100 end-to-end steps; ``--opt dfqat_tile_steps=250 --opt dfqat_e2e_steps=100
--opt dfqat_lr=3e-4 --opt dfqat_q_lr=1e-4``: 5.00 and 9.80 at 2.9-5.3x GPTQ's time) to 75 + 75 steps with higher
tiled-stage learning rates, chosen on TinyStories *training*-text perplexity (int3 and int2). Ablations (int3
unless said): 128 generated sequences are enough at this budget (8 / 32 / 128 / 512 sequences: 5.51 / 5.17 /
5.04 / 5.02, int2 14.5 / 11.2 / 9.74 / 9.81); training tiles alone, tiles of 3 blocks beat one whole-model tile
(5.23 vs 5.33), and with the end-to-end stage they beat 1-block tiles (5.04 vs 5.13); L1 vs L2 and ``fp`` vs
``quant`` tile targets differ by under 1% here, except L2 over L1 with ``quant`` targets and the end-to-end stage
(5.01 vs 5.07), one seed each; real TinyStories text instead of generated text gives 4.92 (int3) and 9.05 (int2).

Settings (``cfg.extra``, ``--opt KEY=VALUE``; defaults in :data:`DEFAULTS`, tuned on stories260K by the
perplexity of TinyStories *training* text, never the held-out text). The learning rates are absolute AdamW
steps, tuned for stories260K's weights and scales: a model with smaller weights (or a bigger one, where
LLM-QAT and EfficientQAT use 1e-5 to 2e-5) needs smaller rates.

* ``dfqat_tile`` (3), ``dfqat_tile_steps`` (75; 0 = no tiled stage; first defaults: 250), ``dfqat_batch``
  (4 sequences), ``dfqat_lr`` (1e-3, weights; first: 3e-4), ``dfqat_q_lr`` (1e-3, quantizer; first: 1e-4), ``dfqat_quantizer`` (lsq),
  ``dfqat_tile_loss`` (l1 | l2), ``dfqat_tile_input`` (fp | quant);
* ``dfqat_e2e_steps`` (75; 0 = off; first: 100), ``dfqat_e2e_batch`` (= dfqat_batch), ``dfqat_e2e_lr`` (3e-4),
  ``dfqat_e2e_q_lr`` (1e-4), ``dfqat_kd`` (fkl | rkl | jsd), ``dfqat_kd_temp`` (1), ``dfqat_teacher``
  (model | topk), ``dfqat_clip`` (1.0), ``dfqat_grad_ckpt`` (false: activation checkpointing of every
  decoder block end to end, which keeps one block's activations instead of all of them, for about one more
  forward pass per step);
* ``dfqat_min_lr`` (0.05, end of the cosine schedule as a fraction), ``dfqat_samples`` (all),
  ``dfqat_data`` (folder), ``dfqat_ckpt`` (folder), ``dfqat_save_every`` (50), ``dfqat_retries`` (3).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .blockwise import capture_inputs, run_block
from .config import QuantConfig
from .models import blocks as blocks_of
from .qmodules import QuantLinear
from .quantize import register

log = logging.getLogger(__name__)

FORMAT = "lowbit-dfqat-1"
STATE = "state.json"
TILE_INPUTS = ("fp", "quant")
TILE_LOSSES = ("l2", "l1")
TEACHERS = ("model", "topk")
MEDIAN_WINDOW = 50  # losses the divergence test takes the running median of
SPIKE = 10.0  # a loss above SPIKE x that median is a spike
SPIKE_SKIPS = 3  # a spike's batch is skipped (no update); this many spikes in a row count as divergence

DEFAULTS = {
    "dfqat_tile": 3,  # decoder blocks per tile
    "dfqat_tile_steps": 75,  # optimisation steps per tile (0: no tiled stage; v1: 250)
    "dfqat_batch": 4,  # sequences per step (tiled stage; end-to-end too unless dfqat_e2e_batch)
    "dfqat_lr": 1e-3,  # tiled stage, Linear weights (v1: 3e-4)
    "dfqat_q_lr": 1e-3,  # tiled stage, quantizer parameters (v1: 1e-4)
    "dfqat_quantizer": "lsq",  # lowbit.learnable kind: ste, lsq, lsq+, lwc, paretoq
    "dfqat_tile_loss": "l1",  # l1 (relative mean absolute error) or l2 (relative MSE)
    "dfqat_tile_input": "fp",  # inputs of the float tile that makes the target: fp (float chain) or quant
    "dfqat_e2e_steps": 75,  # end-to-end distillation steps (0: off; v1: 100)
    "dfqat_e2e_batch": None,  # default: dfqat_batch
    "dfqat_e2e_lr": 3e-4,  # end-to-end, Linear weights
    "dfqat_e2e_q_lr": 1e-4,  # end-to-end, quantizer parameters
    "dfqat_kd": "fkl",  # fkl, rkl, jsd
    "dfqat_kd_temp": 1.0,
    "dfqat_teacher": "model",  # model (full forward pass) or topk (the logits stored in dfqat_data)
    "dfqat_clip": 1.0,  # gradient-norm clipping of the end-to-end stage (0: off)
    "dfqat_grad_ckpt": False,  # end to end: recompute each block's activations in the backward pass (memory)
    "dfqat_min_lr": 0.05,  # the cosine schedule ends at this fraction of the learning rate
    "dfqat_samples": None,  # use only the first n training sequences
    "dfqat_data": None,  # folder of lowbit.datafree.generate_dataset (takes precedence over calib)
    "dfqat_ckpt": None,  # checkpoint folder (None: no checkpoints)
    "dfqat_save_every": 50,  # end-to-end steps between checkpoints / good-state snapshots (0: stage ends only)
    "dfqat_retries": 3,  # divergence retries per stage
}


# ------------------------------------------------------------------------------------------ settings
def settings(cfg: QuantConfig) -> dict:
    """The dfqat settings of ``cfg.extra`` with defaults, checked (one-line ValueErrors)."""
    unknown = sorted(k for k in cfg.extra if k.startswith("dfqat_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"unknown dfqat setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    o = {k: cfg.extra.get(k, v) for k, v in DEFAULTS.items()}
    if o["dfqat_e2e_batch"] is None:
        o["dfqat_e2e_batch"] = o["dfqat_batch"]
    for k, lo in (("dfqat_tile", 1), ("dfqat_batch", 1), ("dfqat_e2e_batch", 1), ("dfqat_tile_steps", 0),
                  ("dfqat_e2e_steps", 0), ("dfqat_save_every", 0), ("dfqat_retries", 0)):
        if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < lo:
            raise ValueError(f"{k} must be an integer >= {lo}, got {o[k]!r}")
    for k in ("dfqat_lr", "dfqat_q_lr", "dfqat_e2e_lr", "dfqat_e2e_q_lr", "dfqat_kd_temp"):
        if isinstance(o[k], bool) or not isinstance(o[k], (int, float)) or not 0 < o[k] < math.inf:
            raise ValueError(f"{k} must be a positive number, got {o[k]!r}")
    for k in ("dfqat_clip", "dfqat_min_lr"):
        if isinstance(o[k], bool) or not isinstance(o[k], (int, float)) or not 0 <= o[k] < math.inf:
            raise ValueError(f"{k} must be a number >= 0, got {o[k]!r}")
    if not isinstance(o["dfqat_grad_ckpt"], bool):
        raise ValueError(f"dfqat_grad_ckpt must be true or false, got {o['dfqat_grad_ckpt']!r}")
    if o["dfqat_min_lr"] > 1:
        raise ValueError(f"dfqat_min_lr is a fraction of the learning rate in [0, 1], got {o['dfqat_min_lr']!r}")
    from .distill import KD_KINDS
    from .learnable import KINDS

    for k, choices in (("dfqat_quantizer", KINDS), ("dfqat_tile_loss", TILE_LOSSES),
                       ("dfqat_tile_input", TILE_INPUTS), ("dfqat_kd", KD_KINDS), ("dfqat_teacher", TEACHERS)):
        if o[k] not in choices:
            raise ValueError(f"{k} must be one of {', '.join(choices)}, got {o[k]!r}")
    if o["dfqat_samples"] is not None and (isinstance(o["dfqat_samples"], bool) or not isinstance(
            o["dfqat_samples"], int) or o["dfqat_samples"] < 1):
        raise ValueError(f"dfqat_samples must be a positive integer, got {o['dfqat_samples']!r}")
    if o["dfqat_teacher"] == "topk" and not o["dfqat_data"]:
        raise ValueError("dfqat_teacher=topk needs dfqat_data=<folder generated with --topk-logits>")
    return o


# ------------------------------------------------------------------------------------------- helpers
def float_teacher(model: nn.Module) -> nn.Module:
    """A frozen float copy of ``model``: every QuantLinear of the copy computes with its float weight,
    unquantized inputs and outputs (no KV-cache quantizer); an online input rotation stays: it is part of the
    transformed float function."""
    teacher = copy.deepcopy(model)
    for m in teacher.modules():
        if isinstance(m, QuantLinear):
            m.w_spec, m.a_spec, m.out_spec = None, None, None
            if getattr(m, "learner", None) is not None:
                del m.learner
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _live(root: nn.Module) -> list[QuantLinear]:
    """Live QuantLinears that quantize something (weights, inputs or outputs): the modules QAT trains."""
    return [m for m in root.modules() if isinstance(m, QuantLinear) and not m.frozen
            and (m.w_spec is not None or m.a_spec is not None or m.out_spec is not None)]


def _param_groups(root: nn.Module, lr: float, q_lr: float) -> list[dict]:
    """AdamW groups: the live Linears' weights, and their learnable quantizers' parameters. A learner with
    ``lr_groups() -> [(params, multiplier), ...]`` (:mod:`lowbit.mixed`) gets one group per entry at
    ``q_lr * multiplier``."""
    from .qmodules import QuantEmbedding

    weights, qps, extra, seen = [], [], [], set()
    learners = []
    for m in _live(root):
        if id(m.weight) not in seen:
            seen.add(id(m.weight))
            weights.append(m.weight)
        learners.append(getattr(m, "learner", None))
    # an embedding table with a learner (lowbit.mixed's learned widths): its quantizer trains, not its weight
    learners += [m.learner for m in root.modules() if isinstance(m, QuantEmbedding) and not m.frozen
                 and getattr(m, "learner", None) is not None]
    for learner in learners:
        if learner is None:
            continue
        groups = learner.lr_groups() if hasattr(learner, "lr_groups") else [(list(learner.parameters()), None)]
        for params, mult in groups:  # mult None: the common quantizer group at q_lr
            fresh = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in fresh)
            if fresh and mult is None:
                qps.extend(fresh)
            elif fresh:
                extra.append({"params": fresh, "lr": q_lr * mult})
    return (([{"params": weights, "lr": lr}] if weights else []) + ([{"params": qps, "lr": q_lr}] if qps else [])
            + extra)


@contextlib.contextmanager
def training_mode(model: nn.Module):
    """Train in fp32 in eval mode with every parameter frozen (stages unfreeze what they train); on exit, even
    after an error, remove the learners of unfrozen modules and restore requires_grad, dtype and mode."""
    from .qmodules import QuantEmbedding

    dtype = next(model.parameters()).dtype
    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    if dtype != torch.float32:
        model.float()  # train in fp32; cast back after the final freeze
    model.eval()
    model.requires_grad_(False)
    try:
        yield
    finally:
        for m in model.modules():  # an error leaves no learner behind
            if isinstance(m, (QuantLinear, QuantEmbedding)) and getattr(m, "learner", None) is not None \
                    and not m.frozen:
                del m.learner
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        if dtype != torch.float32:
            model.to(dtype)
        model.train(was_training)


def _stream_seed(seed: int, stage: str, epoch: int) -> int:
    h = hashlib.blake2b(f"lowbit-dfqat:{seed}:{stage}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _Sampler:
    """Batch ``step`` of an endless stream of seeded permutations of ``range(n)`` (one per epoch): a pure
    function of ``(seed, stage, step)``, so resuming needs no RNG state."""

    def __init__(self, n: int, batch: int, seed: int, stage: str):
        self.n, self.batch, self.seed, self.stage = n, min(batch, n), seed, stage
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_stream_seed(self.seed, self.stage, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def __call__(self, step: int) -> Tensor:
        start = step * self.batch
        return torch.stack([self._perm(j // self.n)[j % self.n] for j in range(start, start + self.batch)])


def _cosine(step: int, steps: int, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def _tile_loss(out: Tensor, target: Tensor, kind: str) -> Tensor:
    """The tiled stage's loss: relative MSE (``l2``) or relative mean absolute error (``l1``)."""
    from .distill import hidden_loss

    return hidden_loss(out, target, kind, normalize=True)


def _kd(student_logits: Tensor, teacher: dict, opts: dict) -> Tensor:
    """The end-to-end loss: logit distillation against the full teacher or its stored top-K logits."""
    from .distill import kd_loss, kd_loss_topk

    if "logits" in teacher:
        return kd_loss(student_logits, teacher["logits"], opts["dfqat_kd"], opts["dfqat_kd_temp"])
    return kd_loss_topk(student_logits, teacher["topk_values"], teacher["topk_indices"], teacher["logsumexp"],
                        opts["dfqat_kd"], opts["dfqat_kd_temp"])


def _finite(params: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


@torch.no_grad()
def _forward(blocks: list[nn.Module], x: Tensor, kw: dict, chunk: int) -> Tensor:
    """``blocks`` applied to every sequence of ``x`` ``(n, L, d)``, ``chunk`` sequences at a time (with several
    processes each computes its share of the chunks, then all gather the result)."""
    starts = range(0, x.shape[0], chunk)
    outs = []
    with distributed.rng_unchanged(x.device):
        for s in (starts[i] for i in distributed.share(len(starts))):
            h = x[s:s + chunk]
            for b in blocks:
                h = run_block(b, h, kw)
            outs.append(h)
    return distributed.all_gather_cat(torch.cat(outs) if outs else x[:0])


@torch.no_grad()
def _tile_error(blocks: list[nn.Module], x: Tensor, target: Tensor, kw: dict, chunk: int) -> float:
    """``||tile(x) - target||^2 / ||target||^2`` over all sequences (the same measure for l1 and l2 runs)."""
    starts = range(0, x.shape[0], chunk)
    sums = []  # (num, den) per chunk: this process's share of the chunks
    with distributed.rng_unchanged(x.device):
        for s in (starts[i] for i in distributed.share(len(starts))):
            h = x[s:s + chunk]
            for b in blocks:
                h = run_block(b, h, kw)
            t = target[s:s + chunk].float()
            sums.append((float((h.float() - t).pow(2).sum()), float(t.pow(2).sum())))
    num = den = 0.0
    for part in distributed.all_gather_object(sums):  # summed in chunk order: the single-process floats
        for a, b in part:
            num += a
            den += b
    return num / max(den, 1e-30)


# ------------------------------------------------------------------------------------- data parallel
def _my_part(idx: Tensor) -> tuple[Tensor, float]:
    """This process's contiguous share of a step's batch ``idx`` and the weight that makes DDP's average of the
    per-process losses the single-process loss of the whole batch (``world * share / batch``; 1 alone)."""
    if not distributed.active():
        return idx, 1.0
    r = distributed.share(len(idx))
    return idx[r.start:r.stop], distributed.world_size() * len(r) / len(idx)


def _tile_ref(target: Tensor, kind: str) -> Tensor:
    """The normaliser of :func:`lowbit.distill.hidden_loss` (mean square for l2, mean absolute value for l1)."""
    t = target.detach().float()
    ref = t.square().mean() if kind == "l2" else t.abs().mean()
    return ref.clamp_min(torch.finfo(torch.float32).tiny)


def _tile_rescale(target: Tensor, kind: str, n: int, batch: int) -> Tensor | float:
    """With several processes, the normalised tile loss of a share is relative to the share's own target scale:
    this factor (no gradient) makes it relative to the whole batch's, as in one process."""
    if not distributed.active():
        return 1.0
    ref = _tile_ref(target, kind)
    whole = distributed.all_reduce_sum(ref * n) / batch  # every sequence has the same number of elements
    return ref / whole


class _StepLoss(nn.Module):
    """One training step's loss on this process's share of the batch as a module, ``forward(step) -> loss``:
    what DistributedDataParallel wraps. ``root`` (a tile, or the whole model) holds the trained parameters
    (Linear weights and their learners, so quantizer parameters are averaged too); ``loss_at`` computes the
    loss (penalty included) with ``root``'s modules."""

    def __init__(self, root: nn.Module, loss_at: Callable[[int], Tensor]):
        super().__init__()
        self.root, self.loss_at = root, loss_at

    def forward(self, step: int) -> Tensor:
        return self.loss_at(step)


def _data_parallel(root: nn.Module, loss_at: Callable[[int], Tensor], find_unused: bool = False
                   ) -> Callable[[int], Tensor]:
    """``loss_at`` itself in one process; with several, a DistributedDataParallel module that computes it and
    averages the gradients of ``root``'s trained parameters over the processes during ``backward`` (a step that
    goes back without ``backward`` is fine). Every trained dfqat parameter gets a gradient at every step;
    ``find_unused`` (on for a ``penalty``, :mod:`lowbit.mixed`) lets some parameters go without one."""
    if not distributed.active():
        return loss_at
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = {"find_unused_parameters": find_unused}
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:  # buffers never change here
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False
    return DDP(_StepLoss(root, loss_at), **kw)


# ----------------------------------------------------------------------------------------- training
def _cpu_state(opt: torch.optim.Optimizer) -> dict:
    return {i: {k: (v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v) for k, v in s.items()}
            for i, s in opt.state_dict()["state"].items()}


def _load_opt_state(opt: torch.optim.Optimizer, state: dict) -> None:
    sd = opt.state_dict()
    sd["state"] = {int(i): dict(s) for i, s in state.items()}
    opt.load_state_dict(sd)


def _train(label: str, groups: list[dict], steps: int, loss_at: Callable[[int], Tensor], opts: dict, *,
           clip: float = 0.0, start: int = 0, lr_scale: float = 1.0, retries: int = 0,
           losses: list[float] | None = None, opt_state: dict | None = None, every: int = 0,
           on_save: Callable[[int, dict], None] | None = None, bar=None, skipped: int = 0) -> dict:
    """AdamW on ``groups`` for steps ``start .. steps - 1`` with cosine decay and the divergence guard.

    ``loss_at(step)`` returns the loss of that step's batch. A good state (parameters, optimizer moments) is
    kept in memory at ``start`` and every ``every`` steps (then ``on_save(step, state)`` is called, e.g. to
    write a checkpoint); a divergence restores it and halves the learning rates. A non-finite loss, gradient
    or parameter is a divergence at once; a loss over ``SPIKE`` x the running median is first taken for a hard
    batch (heavy-tailed hidden states, e.g. LLMs' massive activations): that step makes no update, and only
    ``SPIKE_SKIPS`` spikes in a row count as a divergence. Returns the run's state: ``lr_scale``, ``retries``
    (so far, ``retries`` included), ``skipped`` (spike batches skipped), ``losses`` (per step), ``opt_state``."""
    params = [p for g in groups for p in g["params"]]
    base = [g["lr"] for g in groups]
    opt = torch.optim.AdamW([dict(g) for g in groups], weight_decay=0.0)
    if opt_state:
        _load_opt_state(opt, opt_state)
    losses = list(losses or [])

    def snapshot(step: int) -> dict:
        return {"step": step, "params": [p.detach().to("cpu", copy=True) for p in params],
                "opt_state": _cpu_state(opt), "n_losses": len(losses)}

    def state(step: int) -> dict:
        return {"step": step, "lr_scale": lr_scale, "retries": retries, "skipped": skipped, "losses": list(losses),
                "opt_state": _cpu_state(opt)}

    good = snapshot(start)
    step = start
    in_row = 0  # consecutive spikes
    while step < steps:
        f = _cosine(step, steps, opts["dfqat_min_lr"]) * lr_scale
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        try:
            loss = loss_at(step)
            val = float(loss.detach())
        except ValueError as e:  # a quantizer refuses NaN/inf inputs (weights or activations went non-finite)
            if "NaN or inf" not in str(e):
                raise
            loss, val = None, math.nan
        val = distributed.mean_value(val)  # several processes: the whole batch's loss, the same decision on all
        recent = losses[-MEDIAN_WINDOW:]
        bad = None
        spike = False
        if not math.isfinite(val):
            bad = f"loss became {val}"
        elif len(recent) >= 3 and val > SPIKE * statistics.median(recent):
            in_row += 1
            if in_row >= SPIKE_SKIPS:
                bad = (f"loss jumped to {val:.4g} (over {SPIKE:g}x its running median "
                       f"{statistics.median(recent):.4g}, {in_row} steps in a row)")
            else:
                spike = True  # a hard batch, or the start of a divergence: no update, look at the next one
        else:
            in_row = 0
        if bad is None and not spike:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
            if not torch.isfinite(norm):
                bad = "the gradient became non-finite"
            else:
                opt.step()
                due = step + 1 == steps or (every and (step + 1) % every == 0)
                if due and not _finite(params):
                    bad = "the parameters became non-finite"
        if distributed.active() and distributed.any_true(bad is not None) and bad is None:
            bad = "another process diverged"  # averaged gradients make this rare; all processes go back together
        if bad is not None:
            if retries >= opts["dfqat_retries"]:
                raise ValueError(f"dfqat: {label}: {bad} at step {step + 1} after {retries} retries (learning "
                                 f"rates x{lr_scale:g}); lower them, e.g. --opt dfqat_lr="
                                 f"{opts['dfqat_lr'] / 10:g} --opt dfqat_e2e_lr={opts['dfqat_e2e_lr'] / 10:g}")
            retries += 1
            in_row = 0
            lr_scale *= 0.5
            log.warning("dfqat: %s: %s at step %d; restoring step %d, learning rates x%g (retry %d of %d)",
                        label, bad, step + 1, good["step"], lr_scale, retries, opts["dfqat_retries"])
            with torch.no_grad():
                for p, v in zip(params, good["params"]):
                    p.copy_(v.to(p.device))
            opt = torch.optim.AdamW([dict(g) for g in groups], weight_decay=0.0)
            _load_opt_state(opt, good["opt_state"])
            del losses[good["n_losses"]:]
            step = good["step"]
            if bar is not None:
                bar.n = step
                bar.refresh()
            continue
        if spike:
            skipped += 1
            log.info("dfqat: %s: step %d skipped (loss %.4g over %gx its running median)", label, step + 1, val,
                     SPIKE)
        losses.append(val)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{val:.4g}")
        if every and step % every == 0 and step < steps:
            good = snapshot(step)
            if on_save is not None:
                on_save(step, state(step))
    return state(steps)


# -------------------------------------------------------------------------------------- checkpoints
def _model_tensors(model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """Every QuantLinear's weight, frozen qparams and learner state; and the names of the frozen ones."""
    out: dict[str, Tensor] = {}
    frozen = []
    from .qmodules import QuantEmbedding

    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) and not (isinstance(m, QuantEmbedding)
                                                   and getattr(m, "learner", None) is not None):
            continue
        out[f"{name}.weight"] = m.weight
        for f in ("w_scale", "w_zero", "w_super_scale", "w_super_min"):
            if getattr(m, f) is not None:
                out[f"{name}.{f}"] = getattr(m, f)
        learner = getattr(m, "learner", None)
        if learner is not None:
            for k, v in learner.state_dict().items():
                out[f"{name}.learner.{k}"] = v
        if m.frozen:
            frozen.append(name)
    return out, frozen


@torch.no_grad()
def _load_model_tensors(model: nn.Module, tensors: dict[str, Tensor], frozen: list[str]) -> None:
    mods = dict(model.named_modules())
    per: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith("model:"):
            continue
        key = key[len("model:"):]
        if ".learner." in key:
            name, _, rest = key.partition(".learner.")
            rest = "learner." + rest
        else:
            name, _, rest = key.rpartition(".")
        per.setdefault(name, {})[rest] = t
    for name, parts in per.items():
        from .qmodules import QuantEmbedding

        m = mods.get(name)
        if not isinstance(m, (QuantLinear, QuantEmbedding)):
            raise ValueError(f"dfqat checkpoint: {name} is not a quantized Linear of this model")
        if name in frozen:
            if getattr(m, "learner", None) is not None:
                del m.learner
            m.frozen = True
        m.weight.copy_(parts.pop("weight").to(m.weight))
        learner_sd = {k[len("learner."):]: v for k, v in parts.items() if k.startswith("learner.")}
        if learner_sd:
            m.learner.load_state_dict({k: v.to(m.weight.device) for k, v in learner_sd.items()})
        for f, v in parts.items():
            if not f.startswith("learner."):
                setattr(m, f, v.to(m.weight.device))


class _Checkpoint:
    """``state.json`` + one ``ckpt-*.safetensors`` in a folder (nothing at all without a folder)."""

    def __init__(self, folder, key: str):
        self.folder = Path(folder) if folder else None
        self.key = key
        self.meta: dict = {"tiles_done": 0, "e2e_step": 0, "tiles": [], "e2e": None}
        self.tensors: dict[str, Tensor] = {}

    def load(self) -> bool:
        """Read a checkpoint of the same run, if any (a different run's is a one-line error)."""
        if self.folder is None or not (self.folder / STATE).is_file():
            return False
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.folder / STATE).read_text())
        except json.JSONDecodeError:
            raise ValueError(f"dfqat checkpoint {self.folder / STATE} is not valid JSON; delete it") from None
        if meta.get("format") != FORMAT or meta.get("key") != self.key:
            raise ValueError(f"dfqat checkpoint folder {self.folder} holds another run (different config, float "
                             "model or training data); use a new dfqat_ckpt folder or delete it")
        self.meta = meta
        self.tensors = load_file(str(self.folder / meta["file"]))
        return True

    def opt_state(self) -> dict | None:
        st: dict[int, dict] = {}
        for key, t in self.tensors.items():
            if key.startswith("optim:"):
                i, k = key[len("optim:"):].split(".", 1)
                st.setdefault(int(i), {})[k] = t
        return st or None

    def save(self, model: nn.Module, opt_state: dict | None = None, **meta) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        from .results import write_json

        tensors, frozen = _model_tensors(model)
        if not _finite(list(tensors.values())):
            raise ValueError("dfqat: refusing to checkpoint a non-finite state")
        flat = {f"model:{k}": v for k, v in tensors.items()}
        for i, s in (opt_state or {}).items():
            for k, v in s.items():
                flat[f"optim:{i}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        self.meta.update(meta, format=FORMAT, key=self.key, frozen=frozen)
        name = f"ckpt-t{self.meta['tiles_done']}-e{self.meta['e2e_step']}.safetensors"
        self.meta["file"] = name
        if not distributed.is_main():  # several processes hold the same state: rank 0 writes it
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}, str(tmp))
        os.replace(tmp, self.folder / name)
        write_json(self.folder / STATE, self.meta)
        for old in self.folder.glob("ckpt-*.safetensors"):
            if old.name != name:
                old.unlink()


_RESUME_FREE = ("dfqat_ckpt", "dfqat_save_every", "dfqat_grad_ckpt")  # settings a resumed run may change


def _run_key(cfg: QuantConfig, teacher: nn.Module, ids: Tensor, resolved: dict | None = None) -> str:
    """What a checkpoint must share with this run: the config (but the folder), float weights, ids, and the
    ``resolved`` settings (defaults filled in: a lowbit whose defaults changed does not resume an older run)."""
    from .datafree import model_fingerprint

    d = cfg.to_dict()
    d["extra"] = {k: v for k, v in d["extra"].items() if k not in _RESUME_FREE}
    if resolved is not None:
        d["resolved"] = {k: v for k, v in resolved.items() if k not in _RESUME_FREE}
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    h.update(model_fingerprint(teacher).encode())
    h.update(ids.detach().cpu().contiguous().to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- stages
Penalty = Callable[[nn.Module, int, int], Tensor]  # (trained root, step, steps) -> extra loss (lowbit.mixed)


def _tiled_stage(model: nn.Module, teacher: nn.Module, ids: Tensor, opts: dict, seed: int, ck: _Checkpoint,
                 report: list[dict], progress: bool, penalty: Penalty | None = None,
                 freeze_tiles: bool | None = None) -> None:
    """Forward tiled QAT (module docstring). ``penalty(tile, step, steps)`` is added to each step's loss;
    ``freeze_tiles`` (default: when no end-to-end stage follows) freezes each tile once trained."""
    if freeze_tiles is None:
        freeze_tiles = opts["dfqat_e2e_steps"] == 0
    blocks, tblocks = list(blocks_of(model)), list(blocks_of(teacher))
    k, kind = opts["dfqat_tile"], opts["dfqat_tile_loss"]
    chunk = max(opts["dfqat_batch"], 16)  # sequences per no-grad pass (targets, propagation, errors)
    tiles = [(a, min(a + k, len(blocks))) for a in range(0, len(blocks), k)]
    done = ck.meta["tiles_done"]
    report.extend(dict(r, resumed=True) for r in ck.meta["tiles"][:done])
    if done >= len(tiles):
        return
    hidden, kw = capture_inputs(model, list(ids.split(1)))
    xq = torch.cat(hidden)
    xfp = xq if opts["dfqat_tile_input"] == "fp" else None
    for t, (a, b) in enumerate(tiles):
        stu, tea = blocks[a:b], tblocks[a:b]
        if t < done:  # trained in an earlier run: loaded, only propagated
            xq = _forward(stu, xq, kw, chunk)
            if xfp is not None:
                xfp = _forward(tea, xfp, kw, chunk)
            continue
        t0 = time.time()
        target = _forward(tea, xfp if xfp is not None else xq, kw, chunk)
        tile = nn.ModuleList(stu)
        groups = _param_groups(tile, opts["dfqat_lr"], opts["dfqat_q_lr"])
        label = f"tile {t + 1}/{len(tiles)} (blocks {a}-{b - 1})"
        entry = {"tile": t, "blocks": [a, b - 1], "steps": opts["dfqat_tile_steps"],
                 "rel_mse_before": _tile_error(stu, xq, target, kw, chunk)}
        res = {"losses": [], "lr_scale": 1.0, "retries": 0}
        if groups and opts["dfqat_tile_steps"] > 0:
            params = [p for g in groups for p in g["params"]]
            for p in params:
                p.requires_grad_(True)
            sampler = _Sampler(xq.shape[0], opts["dfqat_batch"], seed, f"tile{t}")

            def loss_at(step: int) -> Tensor:
                idx = sampler(step).to(xq.device)
                part, w = _my_part(idx)  # several processes: this one's share of the batch
                h = xq[part]
                for blk in stu:
                    h = run_block(blk, h, kw)
                loss = _tile_loss(h, target[part], kind)
                if distributed.active():
                    loss = loss * (w * _tile_rescale(target[part], kind, len(part), len(idx)))
                return loss if penalty is None else loss + penalty(tile, step, opts["dfqat_tile_steps"])

            step_loss = _data_parallel(tile, loss_at, penalty is not None)  # DDP over the tile (several processes)
            bar = tqdm(total=opts["dfqat_tile_steps"], desc=f"dfqat {label}", disable=not progress, unit="step")
            try:
                with torch.enable_grad():
                    res = _train(label, groups, opts["dfqat_tile_steps"], step_loss, opts, bar=bar)
            finally:
                bar.close()
                step_loss = None  # drop the DDP wrapper (and its gradient hooks) before anything else trains
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None
            if not _finite(params):
                raise ValueError(f"dfqat: {label}: non-finite weights after training")
        if freeze_tiles:  # nothing trains this tile again: freeze it on its exact grid now
            from .learnable import freeze_learnable

            freeze_learnable(tile)
        entry |= {"rel_mse_after": _tile_error(stu, xq, target, kw, chunk), "losses": res["losses"],
                  "loss_first": res["losses"][0] if res["losses"] else None,
                  "loss_last": res["losses"][-1] if res["losses"] else None,
                  "lr": opts["dfqat_lr"] * res["lr_scale"], "q_lr": opts["dfqat_q_lr"] * res["lr_scale"],
                  "retries": res["retries"], "skipped": res.get("skipped", 0), "seconds": time.time() - t0,
                  "resumed": False}
        report.append(entry)
        xq = _forward(stu, xq, kw, chunk)
        if xfp is not None:
            xfp = target
        target = None  # free the cached targets before the next tile computes its own
        ck.save(model, tiles_done=t + 1, tiles=report[:t + 1], e2e_step=0, e2e=None)
        log.info("dfqat %s: rel. MSE %.4g -> %.4g in %.1fs", label, entry["rel_mse_before"], entry["rel_mse_after"],
                 entry["seconds"])


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module, on: bool = True):
    """Activation checkpointing of every decoder block (architecture-agnostic: each block's ``forward`` is
    wrapped, then restored). Inside, a block keeps only its inputs for the backward pass and recomputes the
    rest there, with the same random state (noise-injecting quantizers draw the same noise)."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(blocks_of(model)) if on else []
    for blk in blocks:
        fwd = blk.forward
        blk.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    try:
        yield
    finally:
        for blk in blocks:
            del blk.forward  # back to the class's forward


def _e2e_stage(model: nn.Module, teacher: nn.Module, ids: Tensor, data, opts: dict, seed: int, ck: _Checkpoint,
               progress: bool, penalty: Penalty | None = None, label: str = "e2e") -> dict:
    """End-to-end distillation (module docstring); ``penalty(model, step, steps)`` is added to each loss."""
    steps = opts["dfqat_e2e_steps"]
    device = next(model.parameters()).device
    groups = _param_groups(model, opts["dfqat_e2e_lr"], opts["dfqat_e2e_q_lr"])
    prev = ck.meta.get("e2e") or {}
    start = ck.meta.get("e2e_step", 0)
    probe = ids[:min(8, len(ids))].to(device)
    entry = {"steps": steps, "batch": opts["dfqat_e2e_batch"], "resumed_at": start,
             "kd_before": prev.get("kd_before") if start else _kd_probe(model, teacher, probe, opts)}
    if not groups:
        return entry | {"losses": [], "seconds": 0.0}
    t0 = time.time() - prev.get("seconds", 0.0)
    sampler = _Sampler(len(ids), opts["dfqat_e2e_batch"], seed, label)

    def loss_at(step: int) -> Tensor:
        idx, w = _my_part(sampler(step))  # several processes: this one's share of the batch (token mean: w)
        batch = ids[idx].to(device)
        if opts["dfqat_teacher"] == "topk":
            tgt = {k: getattr(data, k)[idx].to(device) for k in ("topk_values", "topk_indices", "logsumexp")}
            tgt["topk_indices"] = tgt["topk_indices"].long()
        else:
            with torch.no_grad():
                tgt = {"logits": teacher(batch, use_cache=False).logits}
        loss = _kd(model(batch, use_cache=False).logits, tgt, opts)
        if distributed.active():
            loss = loss * w
        return loss if penalty is None else loss + penalty(model, step, steps)

    def on_save(step: int, st: dict) -> None:
        ck.save(model, opt_state=st["opt_state"], e2e_step=step,
                e2e=entry | {"losses": st["losses"], "lr_scale": st["lr_scale"], "retries": st["retries"],
                             "skipped": st["skipped"], "seconds": time.time() - t0})

    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    step_loss = _data_parallel(model, loss_at, penalty is not None)  # DDP over the model (several processes)
    bar = tqdm(total=steps, initial=start, desc=f"dfqat {label}", disable=not progress, unit="step")
    try:
        with torch.enable_grad(), checkpointed_blocks(model, opts["dfqat_grad_ckpt"]):
            st = _train("end-to-end", groups, steps, step_loss, opts, clip=opts["dfqat_clip"], start=start,
                        lr_scale=prev.get("lr_scale", 1.0), retries=prev.get("retries", 0),
                        skipped=prev.get("skipped", 0),
                        losses=prev.get("losses", []), opt_state=ck.opt_state() if start else None,
                        every=opts["dfqat_save_every"], on_save=on_save, bar=bar)
    finally:
        bar.close()
        step_loss = None  # drop the DDP wrapper (and its gradient hooks)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if start < steps:
        on_save(steps, st)  # the finished stage: a re-run only freezes
    losses = st["losses"]
    return entry | {"losses": losses, "loss_first": losses[0] if losses else None,
                    "loss_last": losses[-1] if losses else None, "kd_after": _kd_probe(model, teacher, probe, opts),
                    "lr": opts["dfqat_e2e_lr"] * st["lr_scale"], "q_lr": opts["dfqat_e2e_q_lr"] * st["lr_scale"],
                    "retries": st["retries"], "skipped": st["skipped"], "seconds": time.time() - t0}


@torch.no_grad()
def _kd_probe(model: nn.Module, teacher: nn.Module, ids: Tensor, opts: dict) -> float:
    """KD loss against the full teacher on a few fixed training sequences (for the report)."""
    from .distill import kd_loss

    return float(kd_loss(model(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits,
                         opts["dfqat_kd"], opts["dfqat_kd_temp"]))


# ---------------------------------------------------------------------------------------- method
def _training_data(calib: Tensor | None, opts: dict):
    data = None
    if opts["dfqat_data"]:
        from .datafree import load_dataset

        data = load_dataset(opts["dfqat_data"])
        if opts["dfqat_teacher"] == "topk" and not data.has_logits:
            raise ValueError(f"dfqat_teacher=topk: {opts['dfqat_data']} has no stored logits (generate it with "
                             "--topk-logits K)")
        ids = data.ids
        source = str(opts["dfqat_data"])
    elif calib is None:
        raise ValueError("dfqat needs training sequences: pass --calib self (generated by the model, no data) or "
                         "--opt dfqat_data=<folder from lowbit gen-data>")
    else:
        ids, source = calib, "calib"
    if opts["dfqat_samples"] is not None:
        ids = ids[:opts["dfqat_samples"]]
        if data is not None:
            for name, v in data.tensors().items():
                setattr(data, name, v[:opts["dfqat_samples"]])
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"dfqat: training ids must be (n, seqlen) with seqlen >= 2, got {tuple(ids.shape)}")
    return ids.long(), data, source


def _check_processes(ids: Tensor, opts: dict) -> None:
    """Several processes: each must get at least one sequence of every step's batch, and all must hold the same
    training ids (one-line ValueErrors, raised on every process alike)."""
    w = distributed.world_size()
    if w == 1:
        return
    for k, on in (("dfqat_batch", opts["dfqat_tile_steps"] > 0), ("dfqat_e2e_batch", opts["dfqat_e2e_steps"] > 0)):
        if on and min(opts[k], len(ids)) < w:
            raise ValueError(f"dfqat: {k}={opts[k]} (with {len(ids)} training sequences) leaves some of the {w} "
                             f"processes without a sequence per step; use at least {w}")
    digest = hashlib.sha256(ids.detach().cpu().contiguous().to(torch.int64).numpy().tobytes()).hexdigest()
    if len(set(distributed.all_gather_object(digest))) > 1:
        raise ValueError("dfqat: the processes hold different training sequences (give every rank the same data and "
                         "seed)")


@register("dfqat", needs_data=True)
def dfqat_method(model: nn.Module, cfg: QuantConfig, calib: Tensor | None = None, progress: bool = True) -> None:
    """Tiled QAT then end-to-end distillation (see the module docstring); the summary goes to
    ``model.dfqat_report``."""
    from .learnable import attach_learnable, freeze_learnable

    opts = settings(cfg)
    ids, data, source = _training_data(calib, opts)
    if not _live(model):
        log.warning("dfqat: no live quantized Linear to train")
        return
    _check_processes(ids, opts)
    progress = progress and distributed.is_main()
    t_start = time.time()
    with training_mode(model):
        teacher = float_teacher(model)
        attach_learnable(model, opts["dfqat_quantizer"])
        ck = _Checkpoint(opts["dfqat_ckpt"], _run_key(cfg, teacher, ids, opts) if opts["dfqat_ckpt"] else "")
        if ck.load():
            _load_model_tensors(model, ck.tensors, ck.meta.get("frozen", []))
            log.info("dfqat: resuming from %s (%d tiles done, end-to-end step %d)", ck.folder,
                     ck.meta["tiles_done"], ck.meta["e2e_step"])
        distributed.barrier()  # every process has read the checkpoint before rank 0 writes the next one
        tiles: list[dict] = []
        if opts["dfqat_tile_steps"] > 0:
            _tiled_stage(model, teacher, ids, opts, cfg.seed, ck, tiles, progress)
        e2e = None
        if opts["dfqat_e2e_steps"] > 0:
            e2e = _e2e_stage(model, teacher, ids, data, opts, cfg.seed, ck, progress)
        live = [p for m in _live(model) for p in (m.weight, *getattr(m, "learner", nn.Module()).parameters())]
        if not _finite(live):
            raise ValueError("dfqat: non-finite weights at the end of training; nothing was frozen")
        freeze_learnable(model)
    model.dfqat_report = {
        "settings": {k: v for k, v in opts.items()}, "data": {"source": source, "n": int(ids.shape[0]),
                                                             "seqlen": int(ids.shape[1])},
        "tiles": tiles, "e2e": e2e, "seconds": time.time() - t_start}
    log.info("dfqat: %s%s in %.1fs", ", ".join(f"tile {r['tile'] + 1} rel. MSE {r['rel_mse_after']:.3g}"
                                                 for r in tiles),
             f", e2e KD {e2e['kd_before']:.4g} -> {e2e.get('kd_after', float('nan')):.4g}" if e2e else "",
             time.time() - t_start)
