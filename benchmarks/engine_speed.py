"""The Hessian solvers' block loop with and without the attention cache, in one run on one machine.

GPTQ (act-order, C4 calibration) on the first ``--blocks`` decoder blocks of the model (the loop's cost is per
block, so a prefix measures it), once with ``attn_cache=false`` (every sequential pass and the block output
recompute attention) and once with the cache (the default). Both start from the same float weights and the
same calibration ids; the record holds each run's wall time and whether the two quantized prefixes give
bit-identical outputs (they must).

    OMP_NUM_THREADS=1 python benchmarks/engine_speed.py --model smollm2-135m --blocks 4 --out results/engine_speed
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from lowbit.blockwise import capture_inputs, for_each_block
from lowbit.calib import calibration_batches
from lowbit.config import QuantConfig, parse_spec
from lowbit.models import arch_of, blocks, load_model, model_name, set_module
from lowbit.quantize import quantize_model
from lowbit.results import run_metadata, write_json


def prefix_model(model: nn.Module, k: int) -> nn.Module:
    """The model with only its first ``k`` decoder blocks (a copy)."""
    m = copy.deepcopy(model)
    set_module(m, arch_of(m).layers, nn.ModuleList(blocks(m)[:k]))
    m.config.num_hidden_layers = k
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--w-format", default="int4")
    ap.add_argument("--w-granularity", default="g128")
    ap.add_argument("--method", default="gptq", choices=["gptq", "spqr"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/engine_speed")
    args = ap.parse_args()
    meta = run_metadata()
    torch.manual_seed(args.seed)
    full, tok = load_model(args.model)
    base = prefix_model(full, args.blocks)
    del full
    calib = calibration_batches(tok, "c4", args.nsamples, args.seqlen, seed=args.seed)
    probe = calib[:2]
    runs, outs = {}, {}
    for cache in (False, True):
        model = copy.deepcopy(base)
        cfg = QuantConfig(weight=parse_spec(args.w_format, args.w_granularity), method=args.method, seed=args.seed,
                          extra={"attn_cache": cache})
        t0 = time.time()
        quantize_model(model, cfg, calib=calib, progress=True)
        runs["on" if cache else "off"] = time.time() - t0
        hidden, kw = capture_inputs(model, list(probe.split(1)))
        outs[cache] = for_each_block(model, hidden, kw)  # the quantized prefix's output hidden states
        print(f"attn_cache={cache}: {runs['on' if cache else 'off']:.1f} s", flush=True)
    same = all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    rec = {"model": model_name(args.model), "method": args.method, "blocks": args.blocks,
           "weights": f"{args.w_format} {args.w_granularity}", "calibration": f"c4 {args.nsamples}x{args.seqlen}",
           "seconds_cache_off": runs["off"], "seconds_cache_on": runs["on"], "speedup": runs["off"] / runs["on"],
           "identical_outputs": same, "seed": args.seed, "threads": torch.get_num_threads(), **meta}
    path = write_json(f"{args.out}/{rec['model']}-{args.method}-{args.blocks}blocks.json", rec)
    print(f"{path}: off {runs['off']:.1f} s, on {runs['on']:.1f} s ({rec['speedup']:.2f}x), identical: {same}")


if __name__ == "__main__":
    main()
