"""Evaluate a grid of weight/activation quantization settings on one model, one JSON per setting.

Resumable: a setting whose JSON already exists under ``--out`` is skipped, and an interrupted
evaluation continues from ``<label>.partial.json`` (the NLLs of the windows already scored). Every JSON holds the
settings, the exact bits per parameter (blocks and whole model), per-window NLLs (so any prefix of
the split can be re-scored), wall times, seed, commit and device.

    python benchmarks/ptq_grid.py --model smollm2-135m --grid rtn-smollm2 --out results/rtn_smollm2
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch

from lowbit.config import QuantConfig, parse_spec
from lowbit.data import eval_ids
from lowbit.eval import default_seqlen, perplexity
from lowbit.models import load_model, model_name
from lowbit.quantize import quantize_model
from lowbit.results import run_metadata, write_json
from lowbit.size import size_report

# label -> (weight spec args, activation spec args or None, full split?)
W = lambda fmt, g=None, sym=False: dict(fmt=fmt, granularity=g, symmetric=sym)  # noqa: E731
GRIDS: dict[str, list[tuple[str, dict | None, dict | None, bool]]] = {
    "rtn-smollm2": [
        ("fp", None, None, True),
        ("int4-g128-asym", W("int4", "g128"), None, True),
        ("int3-g128-asym", W("int3", "g128"), None, True),
        *[(f"int{b}-{g}-asym", W(f"int{b}", g), None, False)
          for b in (8, 4, 3, 2) for g in ("channel", "g128", "g64") if not (b in (4, 3) and g == "g128")],
        *[(f"int{b}-{g}-sym", W(f"int{b}", g, True), None, False) for b in (4, 3) for g in ("channel", "g128", "g64")],
        ("nf4-g64", W("nf4", "g64"), None, False),
        ("fp4_e2m1-g32", W("fp4_e2m1", "g32"), None, False),
        ("mxfp4", W("mxfp4"), None, False),
        ("w8a8-int8-channel-sym-token", W("int8", "channel", True), W("int8", "token", True), False),
        ("w4a8-int4-g128-asym-int8-token", W("int4", "g128"), W("int8", "token", True), False),
    ],
    "rtn-stories260k": [
        ("fp", None, None, True),
        *[(f"int{b}-{g}-asym", W(f"int{b}", g), None, True) for b in (8, 4, 3, 2) for g in ("channel", "g32")],
    ],
}


def run_one(model_id: str, label: str, w: dict | None, a: dict | None, dataset: str, windows: int | None,
            seqlen: int | None, seed: int, meta: dict, out: str) -> dict:
    model, tok = load_model(model_id)
    cfg = None
    t0 = time.time()
    if w is not None:
        cfg = QuantConfig(weight=parse_spec(**w), act=parse_spec(**a) if a else None, method="rtn", seed=seed)
        quantize_model(model, cfg, progress=False)
    quant_s = time.time() - t0
    seqlen = default_seqlen(model, seqlen)
    ids = eval_ids(dataset, tok, seqlen)
    # resumable: windows scored by an interrupted run of the same setting are kept
    partial = Path(out) / f"{label}.partial.json"
    key = {"config": None if cfg is None else cfg.to_dict(), "dataset": dataset, "seqlen": seqlen, "windows": windows}
    done, prev_time = [], 0.0
    if partial.exists():
        old = json.loads(partial.read_text())
        if old["key"] == key:
            done, prev_time = old["nlls"], old["wall_s"]
            print(f"{label}: resuming after {len(done)} windows", flush=True)
    t_eval = time.time()
    save = lambda nlls: write_json(partial, {"key": key, "nlls": nlls, "commit": meta["commit"],  # noqa: E731
                                             "wall_s": prev_time + time.time() - t_eval})
    res = perplexity(model, ids, seqlen, windows, progress=True, desc=label, done=done, on_window=save)
    res["wall_s"] += prev_time  # the whole evaluation, across resumed runs
    partial.unlink(missing_ok=True)
    rep = size_report(model)
    del model
    gc.collect()
    return {
        "model": model_name(model_id), "label": label, "method": "fp" if cfg is None else "rtn",
        "config": None if cfg is None else cfg.to_dict(), "dataset": dataset,
        "quantized": "none" if cfg is None else "every Linear in the decoder blocks; embeddings and head in fp16",
        "calibration": "none (RTN is data-free)",
        "bits": {k: rep[k] for k in ("blocks_bits_per_param", "model_bits_per_param", "model_megabytes")}
        | {"parts": rep["parts"]},
        "metrics": {dataset: res}, "seed": seed, "quant_wall_s": quant_s, "eval_wall_s": res["wall_s"],
        "tokenizer_adds_bos": ids[0].item() == tok.bos_id if tok.bos_id is not None else False,
        **meta,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--grid", default="rtn-smollm2", choices=sorted(GRIDS))
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--windows", type=int, default=40, help="prefix of windows for rows not marked full split")
    ap.add_argument("--seqlen", type=int, default=None, help="default: min(2048, model context)")
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    only = set(args.only.split(",")) if args.only else None
    meta = run_metadata()  # the code that runs is the code imported now, whatever changes on disk later
    for label, w, a, full in GRIDS[args.grid]:
        if only and label not in only:
            continue
        path = Path(args.out) / f"{label}.json"
        if path.exists():
            print(f"skip {label} (exists)")
            continue
        rec = run_one(args.model, label, w, a, args.dataset, None if full else args.windows, args.seqlen, args.seed,
                      meta, args.out)
        write_json(path, rec)
        r = rec["metrics"][args.dataset]
        print(f"{label}: ppl {r['ppl']:.3f} on {r['windows']}/{r['windows_total']} windows, "
              f"{rec['bits']['blocks_bits_per_param']:.3f} bits/param (blocks), eval {rec['eval_wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
