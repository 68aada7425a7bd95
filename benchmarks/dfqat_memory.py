"""Peak memory and time per step of dfqat's end-to-end stage, with and without activation checkpointing
(``dfqat_grad_ckpt``), one process per setting so each peak is its own; one JSON record per setting.

The end-to-end stage is dfqat's memory peak (the whole model trains: weights, AdamW state, the float
teacher, every block's activations for a batch, and the logits). Memory does not depend on what the ids say,
so the sequences are seeded random token ids (no data, no generation time); the records also hold the
stage's losses, which must be the same with and without checkpointing.

    OMP_NUM_THREADS=1 python benchmarks/dfqat_memory.py --model smollm2-135m --out results/dfqat_memory_smollm2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.config import QuantConfig, parse_spec
from lowbit.models import load_model, model_name
from lowbit.quantize import quantize_model
from lowbit.results import run_metadata, write_json


def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args) -> dict:
    """One setting, in this process: load, train end to end for ``--steps`` steps, measure."""
    torch.manual_seed(args.seed)
    model, _ = load_model(args.model)
    model.to(args.device)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(args.seed))
    after_load = _rss_peak_mib()
    extra = {"dfqat_tile_steps": 0, "dfqat_e2e_steps": args.steps, "dfqat_e2e_batch": args.batch,
             "dfqat_grad_ckpt": args.child == "on", "dfqat_e2e_lr": 1e-4, "dfqat_e2e_q_lr": 1e-4}
    cfg = QuantConfig(weight=parse_spec(args.w_format, args.w_granularity), method="dfqat", seed=args.seed,
                      extra=extra)
    t0 = time.time()
    quantize_model(model, cfg, calib=ids, progress=False)
    e2e = model.dfqat_report["e2e"]
    return {"setting": f"grad_ckpt={args.child}", "seed": args.seed, "dfqat_grad_ckpt": args.child == "on",
            "peak_rss_mib": _rss_peak_mib(), "peak_rss_after_load_mib": after_load,
            "quant_wall_s": time.time() - t0, "e2e_seconds": e2e["seconds"],
            "seconds_per_step": e2e["seconds"] / max(args.steps, 1), "losses": e2e["losses"],
            "settings": {"model": model_name(args.model), "weights": f"{args.w_format} {args.w_granularity}",
                         "steps": args.steps, "batch": args.batch, "seqlen": args.seqlen,
                         "nsamples": args.nsamples, "device": args.device, "seed": args.seed}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--w-format", default="int3")
    ap.add_argument("--w-granularity", default="g128")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="sequences per end-to-end step (dfqat's default)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/dfqat_memory")
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.json).write_text(json.dumps(child(args)))
        return
    meta = run_metadata()
    for setting in ("off", "on"):
        tmp = Path(args.out) / f".grad_ckpt-{setting}.tmp.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", setting, "--json", str(tmp)], check=True)
        rec = json.loads(tmp.read_text()) | meta
        tmp.unlink()
        write_json(Path(args.out) / f"grad_ckpt-{setting}.json", rec)
        print(f"{rec['setting']}: peak RSS {rec['peak_rss_mib']:.0f} MiB (after loading {rec['peak_rss_after_load_mib']:.0f}),"
              f" {rec['seconds_per_step']:.1f} s/step, losses {[round(x, 4) for x in rec['losses']]}", flush=True)


if __name__ == "__main__":
    main()
