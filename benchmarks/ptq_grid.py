"""Evaluate a grid of quantization settings (method x format) on one model, one JSON per setting.

Resumable: a setting whose JSON already exists under ``--out`` is skipped, and an interrupted
evaluation continues from ``<label>.partial.json`` (the NLLs of the windows already scored). Every
JSON holds the settings, the calibration set, the exact bits per parameter (blocks and whole model),
per-window NLLs (so any prefix of the split can be re-scored), quantization wall time, peak memory,
seed, commit and device. ``--ckpt`` checkpoints the data-free QAT rows (every tile and N steps) and the
block-by-block PTQ rows (every block): a killed run resumes there, and the record then says
``resumed_from_checkpoint`` (its ``quant_wall_s`` counts this run's share); ``--windows-for c4=40`` scores one set on a
fixed prefix even in full-split rows (for CPU runs). ``--extend`` scores more windows of rows that exist: the
model is rebuilt (from its finished ``--ckpt`` when there is one), must reproduce the recorded first window, and
only the missing windows run; the record keeps the original run's quantization time and says what was added.

    python benchmarks/ptq_grid.py --model smollm2-135m --grid rtn-smollm2 --out results/rtn_smollm2
    python benchmarks/ptq_grid.py --model smollm2-135m --grid ptq-smollm2 --datasets wikitext2,c4 \
        --device cuda --full-split --out results/ptq_smollm2
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.config import QuantConfig, parse_spec
from lowbit.data import eval_ids
from lowbit.eval import default_seqlen, perplexity
from lowbit.models import load_model, model_name
from lowbit.quantize import needs_calibration, quantize_model
from lowbit.results import peak_memory_mb, reset_peak_memory, run_metadata, write_json
from lowbit.size import size_report


@dataclass(frozen=True)
class Setting:
    label: str
    method: str = "fp"  # "fp" = the float model; else a lowbit method or recipe
    w: dict | None = None  # parse_spec kwargs of the weights
    a: dict | None = None  # parse_spec kwargs of the activations
    full: bool = False  # always the full split (else --windows, unless --full-split)
    extra: dict = field(default_factory=dict)  # method settings (cfg.extra)
    kv: dict | None = None  # parse_spec kwargs of the KV cache (outputs of the key/value projections)
    calib: str | None = None  # this row's calibration source (None: the run's --calib); "c4:128x2048" sets its size


W = lambda fmt, g=None, sym=False, **kw: dict(fmt=fmt, granularity=g, symmetric=sym, **kw)  # noqa: E731
A8, A4 = W("int8", "token", True), W("int4", "token", True)

# weight-only settings of issue 3: (label suffix, weight spec, full split); BCQ gets the same group size
W_ONLY = [("w4-g128", W("int4", "g128"), False), ("w3-g128", W("int3", "g128"), True),
          ("w3-channel", W("int3", "channel"), False), ("w2-g64", W("int2", "g64"), True)]
# stories260K's rows are 64 or 172 wide: g128/g64 do not fit, so its analogues use g32
W_ONLY_S260 = [("w4-g32", W("int4", "g32"), True), ("w3-g32", W("int3", "g32"), True),
               ("w3-channel", W("int3", "channel"), True), ("w2-g32", W("int2", "g32"), True)]
# weight-activation settings: per-channel symmetric weights, per-token symmetric activations
W_ACT = [("w8a8", W("int8", "channel", True), A8), ("w4a8", W("int4", "channel", True), A8),
         ("w4a4", W("int4", "channel", True), A4)]
SUFFIXES = [x[0] for x in W_ONLY + W_ONLY_S260 if x[0] != "w3-channel"] + ["w3-channel"] + [x[0] for x in W_ACT]


def _bcq(w: dict) -> dict:
    return dict(w, fmt="bcq" + w["fmt"][3:], symmetric=False)


# OmniQuant at the paper's budget (20 epochs over 128 x 2048 tokens, batch 1) takes ~1 s a step on one CPU thread for
# SmolLM2: ~1 day a row. OMNI_1EPOCH rows run 1 epoch over the same calibration set (1/20 of the budget; still 1.5-1.6x
# data-free QAT's time on the same CPU), labelled `omniquant-1epoch`: a reduced-budget OmniQuant, never the paper's.
OMNI_1EPOCH = {"omni_epochs": 1}


def _ptq_grid(w_only: list, full_wa: bool = False, omni_1epoch: bool = False) -> list[Setting]:
    """The issue-3 grid; ``omni_1epoch`` adds the reduced-budget OmniQuant rows beside the paper-budget ones."""
    rows = [Setting("fp", full=True)]

    def one(suffix: str, w: dict, a: dict | None = None, full: bool = False) -> list[Setting]:
        return [Setting(f"omniquant-1epoch-{suffix}", "omniquant", w, a, full=full, extra=dict(OMNI_1EPOCH))] \
            if omni_1epoch else []

    for suffix, w, full in w_only:
        rows += [Setting(f"rtn-{suffix}", "rtn", w, full=full),
                 Setting(f"gptq-{suffix}", "gptq", w, full=full),
                 *([Setting(f"gptq-noact-{suffix}", "gptq", w, full=full, extra={"act_order": False})]
                   if suffix in ("w4-g128", "w3-g128", "w4-g32", "w3-g32") else []),
                 Setting(f"awq-{suffix}", "awq", w, full=full),
                 Setting(f"omniquant-{suffix}", "omniquant", w, full=full),
                 *one(suffix, w, full=full),
                 Setting(f"hqq-{suffix}", "hqq", dict(w, zero_point="float"), full=full),
                 Setting(f"quarot+gptq-{suffix}", "quarot,gptq", w, full=full),
                 Setting(f"spqr-{suffix}", "spqr", w, full=full),
                 Setting(f"bcq-{suffix}", "bcq", _bcq(w), full=full)]
    for suffix, w, a in W_ACT:
        rows += [Setting(f"rtn-{suffix}", "rtn", w, a, full=full_wa),
                 Setting(f"smoothquant-{suffix}", "smoothquant,rtn", w, a, full=full_wa),
                 Setting(f"omniquant-{suffix}", "omniquant", w, a, full=full_wa),
                 *one(suffix, w, a, full=full_wa),
                 Setting(f"quarot+rtn-{suffix}", "quarot,rtn", w, a, full=full_wa),
                 Setting(f"quarot+gptq-{suffix}", "quarot,gptq", w, a, full=full_wa)]
    return rows


GRIDS: dict[str, list[Setting]] = {
    "rtn-smollm2": [
        Setting("fp", full=True),
        Setting("int4-g128-asym", "rtn", W("int4", "g128"), full=True),
        Setting("int3-g128-asym", "rtn", W("int3", "g128"), full=True),
        *[Setting(f"int{b}-{g}-asym", "rtn", W(f"int{b}", g))
          for b in (8, 4, 3, 2) for g in ("channel", "g128", "g64") if not (b in (4, 3) and g == "g128")],
        *[Setting(f"int{b}-{g}-sym", "rtn", W(f"int{b}", g, True)) for b in (4, 3) for g in ("channel", "g128", "g64")],
        Setting("nf4-g64", "rtn", W("nf4", "g64")),
        Setting("fp4_e2m1-g32", "rtn", W("fp4_e2m1", "g32")),
        Setting("mxfp4", "rtn", W("mxfp4")),
        Setting("w8a8-int8-channel-sym-token", "rtn", W("int8", "channel", True), A8),
        Setting("w4a8-int4-g128-asym-int8-token", "rtn", W("int4", "g128"), A8),
    ],
    "rtn-stories260k": [
        Setting("fp", full=True),
        *[Setting(f"int{b}-{g}-asym", "rtn", W(f"int{b}", g), full=True) for b in (8, 4, 3, 2) for g in ("channel", "g32")],
    ],
    "ptq-smollm2": _ptq_grid(W_ONLY, omni_1epoch=True),
    "ptq-stories260k": _ptq_grid(W_ONLY_S260, full_wa=True),
    # issue 4 on stories260K: data-free QAT and its stages; run with --calib self (no data at all)
    "dfqat-stories260k": [
        Setting("fp", full=True),
        *[row for suffix, w in (("w3-g32", W("int3", "g32")), ("w2-g32", W("int2", "g32"))) for row in (
            Setting(f"rtn-{suffix}", "rtn", w, full=True),
            Setting(f"gptq-{suffix}", "gptq", w, full=True),
            Setting(f"dfqat-tiled-{suffix}", "dfqat", w, full=True, extra={"dfqat_e2e_steps": 0}),
            Setting(f"dfqat-e2e-{suffix}", "dfqat", w, full=True, extra={"dfqat_tile_steps": 0, "dfqat_e2e_steps": 250}),
            Setting(f"dfqat-{suffix}", "dfqat", w, full=True))],
    ],
}


# Settings a row does not name are lowbit.dfqat.DEFAULTS; DFQAT_V1 = the defaults before the cost tuning.
DFQAT_V1 = {"dfqat_tile_steps": 250, "dfqat_e2e_steps": 100, "dfqat_lr": 3e-4, "dfqat_q_lr": 1e-4}

# issue 5 on stories260K: learned per-channel mixed precision (--method mixed) vs uniform per-channel settings
# of about the same real size (int2/int3/int4 channel asym: 2.30 / 3.30 / 4.31 bits/param with metadata, 64-wide
# rows); run with --calib self (no data at all)
_CH = [(b, W(f"int{b}", "channel")) for b in (2, 3, 4)]
GRIDS["mixed-stories260k"] = [
    Setting("fp", full=True),
    *[Setting(f"mixed-{t}", "mixed", W("int8", "channel"), full=True, extra={"mixed_target_bits": t})
      for t in (2.5, 3.0, 4.0)],
    *[row for b, w in _CH for row in (
        Setting(f"rtn-w{b}-channel", "rtn", w, full=True),
        Setting(f"gptq-w{b}-channel", "gptq", w, full=True),
        Setting(f"dfqat-w{b}-channel", "dfqat", w, full=True))],
    *[Setting(f"mixed-{t}-same-size", "mixed", W("int8", "channel"), full=True, extra={"mixed_target_bits": t})
      for t in (2.3, 3.3, 4.3)],  # about the real size of uniform int2 / int3 / int4 per-channel
    Setting("mixed-3.0-noprune", "mixed", W("int8", "channel"), full=True,
            extra={"mixed_target_bits": 3.0, "mixed_prune": False}),
]
# per-part budgets at 3.0 bits/param (the learned split was even: attention 2.93, FFN 2.98): attention held at
# 2.5 or 3.5, the FFN gets the rest; with the first dfqat defaults like the rows above, and a control row that
# reruns mixed-3.0 with them named (the rows above ran before dfqat's defaults changed)
GRIDS["mixed-stories260k"] += [
    Setting(f"mixed-3.0-{tag}", "mixed", W("int8", "channel"), full=True,
            extra=DFQAT_V1 | {"mixed_target_bits": 3.0} | extra)
    for tag, extra in (("v1", {}), ("attn2.5", {"mixed_attn_target": 2.5}), ("attn3.5", {"mixed_attn_target": 3.5}))]
# ablation: the noise range without learned clipping (the full min-max range of each row, before session 7)
GRIDS["mixed-stories260k"] += [
    Setting(f"mixed-{t}-noclip", "mixed", W("int8", "channel"), full=True,
            extra={"mixed_target_bits": t, "mixed_noise_clip": False}) for t in (2.5, 3.0)]
# ablation: no noise phase; the widths come from the diagonal-Fisher repair alone (every row starts at the
# target + 2 and the greedy repair lowers the least sensitive rows to the budget): what the noise phase buys
GRIDS["mixed-stories260k"] += [
    Setting(f"mixed-{t}-fisher-only", "mixed", W("int8", "channel"), full=True,
            extra={"mixed_target_bits": t, "mixed_noise_tile_steps": 0, "mixed_noise_e2e_steps": 0})
    for t in (2.5, 3.0)]
# a scale and zero-point per 32 columns of a row instead of one per row (the widths stay per row): the metadata
# costs ~0.6 bits/param more on these narrow rows, paid out of the same budget
GRIDS["mixed-stories260k"] += [
    Setting(f"mixed-{t}-g32", "mixed", W("int8", "g32"), full=True, extra={"mixed_target_bits": t}) for t in (2.5, 3.0)]


# issue 4, LLM-QAT's W4A8KV4 on stories260K: int4 per-channel symmetric weights (LLM-QAT's weight grid; any row
# width fits), int8 per-token symmetric activations, int4 keys and values per token over all heads, symmetric
# (LLM-QAT), or per token and head (g8: stories260K's head width), asymmetric; run with --calib self (no data)
KV_SETTINGS = [("w4a8", W("int4", "channel", True), A8, None),
               ("w4a8kv4", W("int4", "channel", True), A8, W("int4", "token", True)),
               ("w4a8kv4-head", W("int4", "channel", True), A8, W("int4", "g8"))]
GRIDS["kv-stories260k"] = [
    Setting("fp", full=True),
    Setting("rtn-kv4", "rtn", kv=W("int4", "token", True), full=True),  # the KV cache alone, float weights
    Setting("rtn-kv4-head", "rtn", kv=W("int4", "g8"), full=True),
    Setting("rtn-kv8", "rtn", kv=W("int8", "token", True), full=True),
    *[Setting(f"{m}-{suffix}", m, w, a, full=True, kv=kv)
      for suffix, w, a, kv in KV_SETTINGS for m in ("rtn", "gptq", "dfqat")],
]
KV_SUFFIXES = ["w4a8kv4-head", "w4a8kv4", "w4a8", "kv4-head", "kv4", "kv8"]  # longest first (label endings)


# issue 3, OmniQuant's budget on stories260K: epochs over the same 32 calibration windows (0: the LWC/LET initialisation
# alone; 20: the paper's), for a weight-only and a W4A4 setting, LET off as a control; RTN in the same run. It tells
# how far the reduced-budget `omniquant-1epoch` rows of SmolLM2 stand from the paper's budget.
OMNI_EPOCHS = (0, 1, 5, 20)
GRIDS["omni-budget-stories260k"] = [Setting("fp", full=True)] + [row for suffix, w, a in (
    ("w3-channel", W("int3", "channel"), None), ("w4a4", W("int4", "channel", True), A4)) for row in (
    Setting(f"rtn-{suffix}", "rtn", w, a, full=True),
    *[Setting(f"omniquant-e{e}-{suffix}", "omniquant", w, a, full=True, extra={"omni_epochs": e}) for e in OMNI_EPOCHS],
    *([Setting(f"omniquant-nolet-e{e}-{suffix}", "omniquant", w, a, full=True, extra={"omni_epochs": e, "omni_let": False})
       for e in (1, 20)] if a else []))]


# issue 4, data-free QAT ablations on stories260K: int3 g32 (the main setting) and int2 g32 (token counts, defaults),
# one folder per command under results/dfqat_ablations_stories260k/ (benchmarks/report.py lists the commands).
DFQAT_TOKENS = (8, 32, 128, 512)  # self-generated sequences of 256 tokens (run with --nsamples 512)
_S260_G32 = [("w3-g32", W("int3", "g32")), ("w2-g32", W("int2", "g32"))]


def _dfq(label: str, w: dict, **extra) -> Setting:
    return Setting(label, "dfqat", w, full=True, extra=extra)


# (a) how much generated text: the rows train on the first n of the same 512 sequences, same steps
GRIDS["dfqat-tokens-stories260k"] = [_dfq(f"dfqat-n{n}-{suffix}", w, dfqat_samples=n)
                                     for suffix, w in _S260_G32 for n in DFQAT_TOKENS]
# (b, c, e) tile size (6 > the 5 blocks: the whole model is one tile), tile loss, tile input; tiled stage alone and
# followed by the end-to-end stage; int3 g32
DFQAT_DESIGN = [(3, "l1", "fp"), (1, "l1", "fp"), (6, "l1", "fp"), (3, "l2", "fp"), (3, "l1", "quant"),
                (3, "l2", "quant")]
GRIDS["dfqat-design-stories260k"] = [
    _dfq(f"{stage}-t{t}-{loss}-{inp}-w3-g32", W("int3", "g32"), dfqat_tile=t, dfqat_tile_loss=loss,
         dfqat_tile_input=inp, **e2e)
    for stage, e2e in (("tiled", {"dfqat_e2e_steps": 0}), ("full", {})) for t, loss, inp in DFQAT_DESIGN]
# (d) generated vs real text: run twice, --calib self and --calib tinystories, same --nsamples / --calib-seqlen
GRIDS["dfqat-data-stories260k"] = [row for suffix, w in _S260_G32 for row in (
    Setting(f"gptq-{suffix}", "gptq", w, full=True), _dfq(f"dfqat-tiled-{suffix}", w, dfqat_e2e_steps=0),
    _dfq(f"dfqat-{suffix}", w))]
# (f) cost: RTN, GPTQ and dfqat (each stage alone and both), the defaults and DFQAT_V1, in one run
GRIDS["dfqat-cost-stories260k"] = [Setting("fp", full=True)] + [row for suffix, w in _S260_G32 for row in (
    Setting(f"rtn-{suffix}", "rtn", w, full=True), Setting(f"gptq-{suffix}", "gptq", w, full=True),
    *([_dfq(f"dfqat-tiled-{suffix}", w, dfqat_e2e_steps=0), _dfq(f"dfqat-e2e-{suffix}", w, dfqat_tile_steps=0)]
      if suffix == "w3-g32" else []),
    _dfq(f"dfqat-{suffix}", w),
    *([_dfq(f"dfqat-v1-tiled-{suffix}", w, **(DFQAT_V1 | {"dfqat_e2e_steps": 0})),
       _dfq(f"dfqat-v1-e2e-{suffix}", w, **(DFQAT_V1 | {"dfqat_tile_steps": 0}))] if suffix == "w3-g32" else []),
    _dfq(f"dfqat-v1-{suffix}", w, **DFQAT_V1))]


# (g) which learnable quantizer: straight-through min-max, LSQ (the default), LSQ+, LWC at int3 and int2 g32, and
# ParetoQ's stretched 2-bit grid (stored as int2 with a float zero-point 1.5: +16 bits per group, counted)
GRIDS["dfqat-quantizer-stories260k"] = [
    *[_dfq(f"dfqat-{k}-{suffix}", w, dfqat_quantizer=k) for suffix, w in _S260_G32 for k in ("ste", "lsq", "lsq+", "lwc")],
    _dfq("dfqat-paretoq-w2-g32", dict(W("int2", "g32"), zero_point="float"), dfqat_quantizer="paretoq"),
    # ParetoQ at g64 (2 + 16/64 + 16/64 = 2.5 bits/param) is about the size of asymmetric int2 g32 (2.56)
    _dfq("dfqat-paretoq-w2-g64", dict(W("int2", "g64"), zero_point="float"), dfqat_quantizer="paretoq")]


# SmolLM2 rows of issues 4 and 5 (run with --calib self --nsamples 128 --calib-seqlen 256; GPTQ rows take C4 at
# GPTQ's own 128 x 2048 through their `calib`). The dfqat learning rates for this model: the defaults were tuned on
# stories260K, whose weights are far larger; benchmarks/dfqat_probe.py on PTB (results/dfqat_lr_probe_smollm2)
# chose 3e-4 in the tiles (1e-3 raised the first tile's MSE) and a third of it end to end (the defaults' ratio).
SMOL_DFQAT = {"dfqat_lr": 3e-4, "dfqat_q_lr": 3e-4, "dfqat_e2e_lr": 1e-4, "dfqat_e2e_q_lr": 1e-4}
_SMOL_W = [("w4-g128", W("int4", "g128"), False), ("w3-g128", W("int3", "g128"), True),
           ("w3-channel", W("int3", "channel"), False), ("w2-g64", W("int2", "g64"), True)]
GRIDS["dfqat-smollm2"] = [Setting("fp", full=True)] + [row for suffix, w, full in _SMOL_W for row in (
    Setting(f"rtn-{suffix}", "rtn", w, full=full),
    Setting(f"gptq-c4-{suffix}", "gptq", w, full=full, calib="c4:128x2048"),  # GPTQ's own protocol
    Setting(f"dfqat-tiled-{suffix}", "dfqat", w, full=full, extra=SMOL_DFQAT | {"dfqat_e2e_steps": 0}),
    # end to end only, at the combined pipeline's wall time: its 10 tiles cost about as much as 50 end-to-end
    # steps on this model (~1100 s vs ~21 s a step on one CPU thread), so 75 + 50 steps
    Setting(f"dfqat-e2e-{suffix}", "dfqat", w, full=full,
            extra=SMOL_DFQAT | {"dfqat_tile_steps": 0, "dfqat_e2e_steps": 125}),
    Setting(f"dfqat-{suffix}", "dfqat", w, full=full, extra=dict(SMOL_DFQAT)))] + [
    # int2 with ParetoQ's stretched grid (float zero-point) at g128: 2 + 32/128 bits, the size of asymmetric int2
    # g64 (section (g) on stories260K: ParetoQ g64 beat LSQ int2 g32 at a smaller size)
    Setting("dfqat-paretoq-w2-g128", "dfqat", dict(W("int2", "g128"), zero_point="float"), full=True,
            extra=SMOL_DFQAT | {"dfqat_quantizer": "paretoq"})]
GRIDS["mixed-smollm2"] = [
    Setting("fp", full=True),
    *[Setting(f"mixed-{t}", "mixed", W("int8", "channel"), full=True, extra=SMOL_DFQAT | {"mixed_target_bits": t})
      for t in (2.5, 3.0, 4.0)],
    # scales per 128 columns of a row (widths still per row): ~0.14 bits/param of metadata more, out of the budget;
    # uniform int3 g128 (3.165 bits/param) is far better than int3 per channel (3.032) on this model
    *[Setting(f"mixed-{t}-g128", "mixed", W("int8", "g128"), full=True,
              extra=SMOL_DFQAT | {"mixed_target_bits": t}) for t in (2.5, 3.0)],
    *[row for b in (2, 3, 4) for row in (
        Setting(f"rtn-w{b}-channel", "rtn", W(f"int{b}", "channel"), full=b == 4),
        Setting(f"gptq-c4-w{b}-channel", "gptq", W(f"int{b}", "channel"), full=b == 4, calib="c4:128x2048"),
        Setting(f"dfqat-w{b}-channel", "dfqat", W(f"int{b}", "channel"), full=b == 4, extra=dict(SMOL_DFQAT)))],
]


class Calibration:
    """Calibration batches, made once per run and shared by every data-hungry setting."""

    def __init__(self, source: str, n: int, seqlen: int | None, seed: int):
        self.source, self.n, self.seqlen, self.seed = source, n, seqlen, seed
        self._ids = None
        self.seconds = 0.0
        self._others: dict[str, "Calibration"] = {}

    def for_source(self, source: str | None) -> "Calibration":
        """Another source (a row's own ``calib``: ``c4``, or ``c4:128x2048`` with its own sequences x length;
        else the run's sizes), made once per run."""
        if source is None or source == self.source:
            return self
        if source not in self._others:
            name, _, size = source.partition(":")
            n, seqlen = (int(x) for x in size.split("x")) if size else (self.n, self.seqlen)
            self._others[source] = Calibration(name, n, seqlen, self.seed)
        return self._others[source]

    def get(self, model, tok, eval_seqlen: int) -> tuple[torch.Tensor, dict]:
        from lowbit.calib import calibration_batches

        seqlen = self.seqlen or eval_seqlen
        if self._ids is None:
            t0 = time.time()
            self._ids = calibration_batches(tok, self.source, self.n, seqlen, seed=self.seed, model=model)
            self.seconds = time.time() - t0  # generating it, for source self: part of a data-free method's cost
        info = {"source": self.source, "nsamples": self.n, "seqlen": seqlen, "seed": self.seed,
                "seconds_to_make": round(self.seconds, 1),
                "note": "C4 validation sample documents 1100+ (never the evaluation text)" if self.source == "c4"
                else ("text generated by the float model itself (no data)" if self.source == "self"
                      else ("the training 90% of the TinyStories sample (never the held-out text)"
                            if self.source == "tinystories" else ""))}
        return self._ids, info


def _resumed(obj) -> bool:
    """Whether a training report (any nesting) holds a stage entry loaded from a checkpoint."""
    if isinstance(obj, dict):
        return obj.get("resumed") is True or any(_resumed(v) for v in obj.values())
    return isinstance(obj, list) and any(_resumed(v) for v in obj)


def _needs_more(rec: dict, datasets: list[str], windows: int | None, windows_for: dict[str, int]) -> bool:
    """Whether ``rec`` lacks a set or scored fewer windows of one than this run asks for."""
    for ds in datasets:
        m = rec["metrics"].get(ds)
        if m is None:
            return True
        want = windows_for[ds] if ds in windows_for else windows
        if want is not None and windows is not None:
            want = min(want, windows)
        if m["windows"] < min(m["windows_total"], want or m["windows_total"]):
            return True
    return False


def run_one(model_id: str, s: Setting, datasets: list[str], windows: int | None, seqlen: int | None, seed: int,
            meta: dict, out: str, device: str, calib: Calibration, windows_for: dict[str, int] | None = None,
            ckpt: str | None = None, previous: dict | None = None) -> dict:
    """One row: quantize, score every set, return the record. ``previous``: the row's existing record, for
    ``--extend`` (its scored windows are kept after the rebuilt model is checked to reproduce its first one)."""
    model, tok = load_model(model_id)
    model.to(device)
    peak_scope = "row" if reset_peak_memory(device) else "process"  # each row's own peak, model loaded
    cfg = None
    seqlen = default_seqlen(model, seqlen)
    calib_info = "none (data-free)"
    t0 = time.time()
    if s.w is not None or s.a is not None or s.kv is not None:
        extra = dict(s.extra)
        if ckpt and s.method in ("dfqat", "mixed"):  # a killed run resumes from its last tile / step
            extra.setdefault("dfqat_ckpt", str(Path(ckpt) / s.label))
        cfg = QuantConfig(weight=parse_spec(**s.w) if s.w else None, act=parse_spec(**s.a) if s.a else None,
                          method=s.method, seed=seed, extra=extra, kv=parse_spec(**s.kv) if s.kv else None)
        ids = None
        if needs_calibration(s.method):
            ids, calib_info = calib.for_source(s.calib).get(model, tok, seqlen)
            t0 = time.time()  # the calibration text is shared by all settings: not part of the method's time
        block_ckpt = str(Path(ckpt) / s.label) if ckpt and s.method not in ("dfqat", "mixed") else None
        quantize_model(model, cfg, calib=ids, progress=True, ckpt=block_ckpt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    quant_s = time.time() - t0
    peak = peak_memory_mb(device)
    metrics, checks = {}, {}
    for ds in datasets:
        ids = eval_ids(ds, tok, seqlen)
        ds_windows = windows
        if windows_for and ds in windows_for:  # a fixed prefix for this set (said in the tables)
            ds_windows = windows_for[ds] if windows is None else min(windows, windows_for[ds])
        # resumable: windows scored by an interrupted run of the same setting are kept
        partial = Path(out) / f"{s.label}.{ds}.partial.json"
        key = {"config": None if cfg is None else cfg.to_dict(), "dataset": ds, "seqlen": seqlen,
               "windows": ds_windows}
        done, prev_time = [], 0.0
        old_m = (previous or {}).get("metrics", {}).get(ds)
        if old_m and old_m.get("window_nlls"):
            done, prev_time = list(old_m["window_nlls"]), old_m["wall_s"]
            again = perplexity(model, ids, seqlen, 1, progress=False)["window_nlls"][0]
            if abs(again - done[0]) > 1e-3 * max(1.0, abs(done[0])):
                raise ValueError(f"--extend: the rebuilt model scores {ds} window 0 at NLL {again:.5f}, the record "
                                 f"at {done[0]:.5f}: the code or the checkpoint changed; delete the JSON and rerun "
                                 "the row")
            checks[ds] = {"window": 0, "nll_recorded": done[0], "nll_rebuilt": again}
        if partial.exists():
            old = json.loads(partial.read_text())
            if old["key"] == key:
                done, prev_time = old["nlls"], old["wall_s"]
                print(f"{s.label}: resuming {ds} after {len(done)} windows", flush=True)
        t_eval = time.time()
        save = lambda nlls: write_json(partial, {"key": key, "nlls": nlls, "commit": meta["commit"],  # noqa: E731
                                                 "wall_s": prev_time + time.time() - t_eval})
        res = perplexity(model, ids, seqlen, ds_windows, progress=True, desc=f"{s.label} {ds}", done=done,
                         on_window=save)
        res["wall_s"] += prev_time  # the whole evaluation, across resumed runs
        partial.unlink(missing_ok=True)
        metrics[ds] = res
    rep = size_report(model)
    reports = {k: getattr(model, k) for k in ("mixed_report", "dfqat_report", "ptq_resume", "omniquant_report")
               if getattr(model, k, None) is not None}
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    rec = {
        "model": model_name(model_id), "label": s.label, "method": s.method,
        "config": None if cfg is None else cfg.to_dict(), "datasets": datasets,
        "quantized": "none" if cfg is None else "every Linear in the decoder blocks; embeddings and head in fp16"
        + ("; KV cache: the key/value projections' outputs" if cfg.kv is not None else ""),
        "calibration": calib_info,
        "bits": {k: rep[k] for k in ("blocks_bits_per_param", "model_bits_per_param", "model_megabytes")}
        | {"parts": rep["parts"]},
        "metrics": metrics, "seed": seed, "quant_wall_s": quant_s, "peak_memory_mb": peak,
        "peak_memory_scope": peak_scope,
        "eval_wall_s": sum(m["wall_s"] for m in metrics.values()),
        # resumed from --ckpt: quant_wall_s then counts only this run's share of the training
        "resumed_from_checkpoint": _resumed(reports) or "ptq_resume" in reports,
        **reports,
        **meta,
    }
    if previous is None:
        return rec
    # --extend: the record of the original run (its quantization time, memory, training report, commit) with
    # more windows scored; what the extension ran is said in "extended"
    if rec["bits"]["blocks_bits_per_param"] != previous["bits"]["blocks_bits_per_param"]:
        raise ValueError("--extend: the rebuilt model's bits per parameter differ from the record's; rerun the row")
    ext = {"commit": meta["commit"], "date": meta.get("date"), "command": meta.get("command"),
           "wall_s": quant_s + sum(m["wall_s"] - ((previous["metrics"].get(ds) or {}).get("wall_s") or 0)
                                   for ds, m in metrics.items()),
           "windows_before": {ds: m["windows"] for ds, m in previous["metrics"].items()}, "checks": checks}
    merged = dict(previous["metrics"])
    for ds, m in metrics.items():  # a set the record already scored on more windows keeps them
        if ds not in merged or m["windows"] >= merged[ds]["windows"]:
            merged[ds] = m
    # a training report the original record lacks (rows run before it was kept) comes from the restored blocks:
    # OmniQuant's checkpoint keeps each block's loss and time
    filled = {k: v for k, v in reports.items() if k == "omniquant_report" and k not in previous}
    return dict(previous, **filled, metrics=merged, datasets=[*previous["datasets"],
                                                    *(d for d in datasets if d not in previous["datasets"])],
                eval_wall_s=sum(m["wall_s"] for m in merged.values()),
                extended=[*previous.get("extended", []), ext])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grid", default="rtn-smollm2", choices=sorted(GRIDS))
    ap.add_argument("--datasets", "--dataset", default="wikitext2", help="comma-separated evaluation sets")
    ap.add_argument("--windows", type=int, default=40, help="prefix of windows for rows not marked full split")
    ap.add_argument("--full-split", action="store_true", help="every row on the full split (a GPU makes it cheap)")
    ap.add_argument("--seqlen", type=int, default=None, help="default: min(2048, model context)")
    ap.add_argument("--only", default=None,
                    help="comma-separated labels or patterns with * (e.g. 'gptq-*,*-w3-g128'), run in this order")
    ap.add_argument("--stop-after", type=float, default=None,
                    help="start no new setting after this many seconds (the rest resumes on the next run)")
    ap.add_argument("--calib", default="c4", help="calibration source for methods that need data: c4, self, a file")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=None, help="default: the evaluation window")
    ap.add_argument("--windows-for", default="",
                    help="per-set window caps, e.g. c4=40: that set is scored on a fixed prefix even in full-split rows")
    ap.add_argument("--ckpt", default=None,
                    help="checkpoint folder (<ckpt>/<label>): dfqat/mixed rows save every tile and N steps, the "
                         "block-by-block PTQ rows every block; a killed run resumes there")
    ap.add_argument("--extend", action="store_true",
                    help="only rows that exist: those whose JSON scored fewer windows than asked now are rebuilt (dfqat/mixed "
                         "rows from their finished --ckpt), checked to reproduce their first window, and scored on "
                         "the missing windows only; the record keeps the original run's times")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lowbit.cli import _device

    device = _device(args.device)
    torch.manual_seed(args.seed)
    datasets = [d for d in args.datasets.split(",") if d]
    try:
        windows_for = {k: int(v) for k, v in (x.split("=") for x in args.windows_for.split(",") if x)}
    except ValueError:
        ap.error(f"--windows-for takes DATASET=N pairs such as c4=40, got {args.windows_for!r}")
    rows = GRIDS[args.grid]
    if args.only:
        import fnmatch

        picked: list[Setting] = []
        for pat in (o for o in args.only.split(",") if o):
            picked += [s for s in rows if fnmatch.fnmatchcase(s.label, pat) and s not in picked]
        rows = picked
    t_start = time.time()
    meta = run_metadata()  # the code that runs is the code imported now, whatever changes on disk later
    calib = Calibration(args.calib, args.nsamples, args.calib_seqlen, args.seed)
    for s in rows:
        if args.stop_after is not None and time.time() - t_start > args.stop_after:
            print(f"stopping before {s.label}: --stop-after {args.stop_after:.0f}s reached", flush=True)
            break
        path = Path(args.out) / f"{s.label}.json"
        windows = None if (s.full or args.full_split) else args.windows
        previous = None
        if args.extend and not path.exists():
            print(f"skip {s.label} (no record to extend)")
            continue
        if path.exists():
            if not args.extend or not _needs_more(previous := json.loads(path.read_text()), datasets, windows,
                                                  windows_for):
                print(f"skip {s.label} (exists)")
                continue
            ck_state = Path(args.ckpt or "") / s.label / "state.json"
            if s.method in ("dfqat", "mixed") and not (args.ckpt and ck_state.is_file()):
                print(f"{s.label}: FAILED: --extend needs the row's finished checkpoint ({ck_state} not found; pass "
                      "the --ckpt of its run) or it would train again; rerun the row instead", flush=True)
                continue
        try:
            rec = run_one(args.model, s, datasets, windows, args.seqlen, args.seed, meta, args.out, device, calib,
                          windows_for, args.ckpt, previous)
        except (ValueError, RuntimeError, TypeError, KeyError) as e:  # one failing method must not stop a long grid
            print(f"{s.label}: FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}", flush=True)
            continue
        write_json(path, rec)
        r = rec["metrics"][datasets[0]]
        print(f"{s.label}: ppl {r['ppl']:.3f} ({datasets[0]}, {r['windows']}/{r['windows_total']} windows), "
              f"{rec['bits']['blocks_bits_per_param']:.3f} bits/param (blocks), quant {rec['quant_wall_s']:.1f}s, "
              f"peak {rec['peak_memory_mb']:.0f} MiB, eval {rec['eval_wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
