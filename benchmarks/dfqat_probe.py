"""Tune data-free QAT's learning rates and tile loss for a new model on a CPU, on a tuning set (PTB) that
no table reports, one JSON record per probe.

Two modes, both on pre-generated text (``lowbit gen-data``: no data) so every probe trains on the same ids:

* ``tile``: the model cut to its first ``--tile`` blocks, one tiled stage of dfqat per learning rate; the
  record holds the tile's relative MSE before and after training and its first and last loss (minutes).
* ``full``: the whole dfqat pipeline with the given ``--opt`` settings, then perplexity on the first
  ``--windows`` windows of the PTB test text (the tuning set; WikiText-2 and C4 are what the tables report).

    lowbit gen-data smollm2-135m --out runs/smol_gen_128x256 --n-sequences 128 --seq-len 256 --batch-size 32 --seed 0
    python benchmarks/dfqat_probe.py tile --data runs/smol_gen_128x256 --lrs 1e-3,1e-4,3e-4 \
        --out results/dfqat_lr_probe_smollm2
    python benchmarks/dfqat_probe.py full --data runs/smol_gen_128x256 --opt dfqat_e2e_steps=0 \
        --opt dfqat_lr=3e-4 --opt dfqat_q_lr=3e-4 --opt dfqat_tile_loss=l1 --label tiled-l1 --out ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lowbit.cli import _parse_opts
from lowbit.config import QuantConfig, parse_spec
from lowbit.data import eval_ids
from lowbit.datafree import load_dataset
from lowbit.eval import perplexity
from lowbit.models import load_model, model_name
from lowbit.quantize import quantize_model
from lowbit.results import run_metadata, write_json


def _cfg(args, extra: dict) -> QuantConfig:
    return QuantConfig(weight=parse_spec(args.w_format, args.w_granularity), method="dfqat", seed=args.seed,
                       extra={"dfqat_data": args.data} | extra)


def probe_tile(args, meta: dict) -> None:
    ids = load_dataset(args.data).ids
    for lr in (float(x) for x in args.lrs.split(",")):
        torch.manual_seed(args.seed)
        model, _ = load_model(args.model)
        model.model.layers = model.model.layers[:args.tile]
        model.config.num_hidden_layers = args.tile
        extra = {"dfqat_e2e_steps": 0, "dfqat_tile": args.tile, "dfqat_tile_steps": args.steps, "dfqat_lr": lr,
                 "dfqat_q_lr": lr} | args.opt
        cfg = _cfg(args, extra)
        t0 = time.time()
        quantize_model(model, cfg, calib=ids, progress=False)
        r = model.dfqat_report["tiles"][0]
        rec = {"mode": "tile", "model": model_name(args.model), "config": cfg.to_dict(), "lr": lr,
               "rel_mse_before": r["rel_mse_before"], "rel_mse_after": r["rel_mse_after"],
               "loss_first": r["loss_first"], "loss_last": r["loss_last"], "retries": r["retries"],
               "wall_s": time.time() - t0, "seed": args.seed, **meta}
        write_json(Path(args.out) / f"tile-{args.w_format}-{args.w_granularity}-lr{lr:g}.json", rec)
        print(f"lr {lr:g}: tile rel. MSE {r['rel_mse_before']:.4g} -> {r['rel_mse_after']:.4g}, loss "
              f"{r['loss_first']:.4g} -> {r['loss_last']:.4g}", flush=True)


def probe_full(args, meta: dict) -> None:
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    cfg = _cfg(args, dict(args.opt))
    t0 = time.time()
    quantize_model(model, cfg, calib=None, progress=True)
    quant_s = time.time() - t0
    rep = model.dfqat_report
    ppl = perplexity(model, eval_ids("ptb", tok, 2048), 2048, max_windows=args.windows, progress=True, desc="ptb")
    rec = {"mode": "full", "model": model_name(args.model), "config": cfg.to_dict(), "label": args.label,
           "tuning_set": {"dataset": "ptb", "windows": ppl["windows"], "seqlen": 2048}, "ptb_ppl": ppl["ppl"],
           "tiles": [{k: t.get(k) for k in ("tile", "rel_mse_before", "rel_mse_after", "loss_first", "loss_last",
                                             "retries", "skipped", "seconds")} for t in rep["tiles"]],
           "e2e": None if rep["e2e"] is None else {k: v for k, v in rep["e2e"].items() if k != "losses"},
           "quant_wall_s": quant_s, "seed": args.seed, **meta}
    write_json(Path(args.out) / f"full-{args.w_format}-{args.w_granularity}-{args.label}.json", rec)
    print(f"{args.label}: PTB ppl {ppl['ppl']:.3f} ({ppl['windows']} windows), quant {quant_s:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["tile", "full"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True, help="folder written by lowbit gen-data")
    ap.add_argument("--w-format", default="int3")
    ap.add_argument("--w-granularity", default="g128")
    ap.add_argument("--lrs", default="1e-3,3e-4,1e-4", help="tile mode: learning rates (weights and quantizer)")
    ap.add_argument("--tile", type=int, default=3, help="tile mode: blocks kept")
    ap.add_argument("--steps", type=int, default=75, help="tile mode: steps")
    ap.add_argument("--windows", type=int, default=8, help="full mode: PTB windows of 2048 tokens")
    ap.add_argument("--label", default="probe")
    ap.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="dfqat settings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.opt = _parse_opts(args.opt)
    meta = run_metadata()
    (probe_tile if args.mode == "tile" else probe_full)(args, meta)


if __name__ == "__main__":
    main()
