"""Why GPTQ does not beat RTN at int4 g128 on SmolLM2: its layer objective, measured where it counts.

GPTQ minimises ``tr(E H E^T)`` with ``E = W - Q`` and ``H = 2/n sum x x^T`` over the layer's inputs. This probe takes
``H`` of every quantized Linear of some decoder blocks from the float model (calibration: C4; held out: the first
WikiText-2 windows) and reports, for RTN and GPTQ (act-order with static groups, lowbit's default; and without
act-order), the relative objective ``tr(E H E^T) / tr(W H W^T)``

* on the calibration Hessian (what GPTQ minimises),
* on the held-out Hessian,
* on the held-out Hessian without its *massive* input channels (``H_ii`` above ``--massive`` times the median):
  the error that reaches the bulk of the input channels, where a few huge, nearly constant activations do not
  dominate the sum.

SpQR (GPTQ with ``--outlier-frac`` of each layer's weights kept in fp16) is probed too, with where its outliers fall:
the share of them on the massive input channels against the share of the weights those channels hold (does a
sparse fp16 part help on this model because it catches the massive channels' weights?).

It also checks the other suspect, the checkpoint's origin (its weights lie on an asymmetric 4-bit g32 grid): the
fraction of weights that RTN at the probed spec reproduces exactly, and RTN's relative weight error on the
weights as stored and after a uniform dither of half a g32 step that takes them off that grid.

    OMP_NUM_THREADS=1 python benchmarks/gptq_probe.py --model smollm2-135m --specs int4:g128,int3:g128 --out results/gptq_probe
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn

from lowbit.calib import calibration_batches
from lowbit.config import parse_spec
from lowbit.data import eval_ids
from lowbit.gptq import accumulate_hessian, gptq
from lowbit.models import arch_of, blocks, load_model, model_name
from lowbit.quantizer import dequantize, fake_quantize
from lowbit.results import run_metadata, write_json
from lowbit.spqr import spqr

SOLVERS = {"rtn": None, "gptq": {"act_order": True}, "gptq-noact": {"act_order": False}, "spqr": {"act_order": True}}


def hessians(model: nn.Module, ids: Tensor, layers: list[int]) -> dict[str, Tensor]:
    """``H = 2/n sum x x^T`` of the input of each true-sequential group's first Linear in ``layers`` (float model)."""
    arch = arch_of(model)
    acc: dict[str, list] = {}
    hooks = []
    for i in layers:
        for group in arch.sequential:
            name = f"{i}.{group[0]}"
            mod = blocks(model)[i].get_submodule(group[0])

            def hook(m, args, name=name):
                acc[name] = list(accumulate_hessian(*(acc.get(name) or (None, 0)), args[0].detach()))

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x in ids.split(1):
                model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v[0] for k, v in acc.items()}


def rel_objective(E: Tensor, W: Tensor, H: Tensor, keep: Tensor | None = None) -> float:
    """``tr(E H E^T) / tr(W H W^T)``, restricted to the input channels ``keep``."""
    if keep is not None:
        E, W, H = E[:, keep], W[:, keep], H[keep][:, keep]
    E, W = E.double(), W.double()
    return (torch.einsum("ij,jk,ik->", E, H, E) / torch.einsum("ij,jk,ik->", W, H, W)).item()


def lattice_check(model: nn.Module, spec, seed: int) -> dict:
    """RTN at ``spec`` on every decoder Linear: fraction of exactly reproduced weights and relative error, on the
    weights as stored and dithered off their 4-bit g32 grid (uniform, half a g32 min-max step)."""
    g = torch.Generator().manual_seed(seed)
    tot = {"stored": [0, 0, 0.0, 0.0], "dithered": [0, 0, 0.0, 0.0]}
    for blk in blocks(model):
        for mod in blk.modules():
            if not isinstance(mod, nn.Linear) or mod.weight.shape[1] % 32:
                continue
            W = mod.weight.detach().float()
            Wg = W.reshape(-1, 32)
            step = ((Wg.amax(1) - Wg.amin(1)) / 15).clamp_min(1e-12)[:, None]
            noise = (torch.rand(Wg.shape, generator=g) - 0.5) * step
            for kind, X in (("stored", W), ("dithered", (Wg + noise).reshape(W.shape))):
                err = (fake_quantize(X, spec) - X).abs()
                t = tot[kind]
                t[0] += int((err.reshape(-1, 32) <= 1e-3 * step).sum())
                t[1] += X.numel()
                t[2] += err.pow(2).sum().item()
                t[3] += X.pow(2).sum().item()
    return {k: {"exact_fraction": e / n, "rel_mse": se / sw} for k, (e, n, se, sw) in tot.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="0,10,20,29", help="decoder blocks to probe")
    ap.add_argument("--specs", default="int4:g128,int3:g128", help="format:granularity, comma-separated")
    ap.add_argument("--calib", default="c4", help="calibration source (lowbit.calib: c4, tinystories, a text file)")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows for the Hessian")
    ap.add_argument("--heldout-data", default="wikitext2", help="evaluation text of the held-out Hessian")
    ap.add_argument("--heldout", type=int, default=4, help="windows of it for the held-out Hessian")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--massive", type=float, default=20.0, help="an input channel is massive above this x median H_ii")
    ap.add_argument("--outlier-frac", type=float, default=0.01, help="SpQR: share of each layer's weights kept in fp16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/gptq_probe")
    args = ap.parse_args()
    specs = []  # checked before the model loads and the Hessians take minutes
    for text in args.specs.split(","):
        fmt, _, gran = text.partition(":")
        gran = gran or "channel"  # parse_spec's default, named for the record's file
        try:
            specs.append((fmt, gran, parse_spec(fmt, gran)))
        except ValueError as e:
            raise SystemExit(f"--specs {text!r}: {e} (write format:granularity, e.g. int4:g128)") from None
    if not 0 <= args.outlier_frac < 1:
        raise SystemExit(f"--outlier-frac {args.outlier_frac}: must lie in [0, 1), e.g. 0.01")
    meta = run_metadata()
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model(args.model)
    model.eval()
    layers = [int(i) for i in args.layers.split(",")]
    if any(not 0 <= i < len(blocks(model)) for i in layers):
        raise SystemExit(f"--layers {args.layers}: the model has blocks 0-{len(blocks(model)) - 1}")
    calib = calibration_batches(tok, args.calib, args.nsamples, args.seqlen, seed=args.seed)
    held = eval_ids(args.heldout_data, tok, args.seqlen)[: args.heldout * args.seqlen]
    if held.numel() < args.heldout * args.seqlen:
        raise SystemExit(f"--heldout {args.heldout}: {args.heldout_data} has fewer windows of {args.seqlen} tokens")
    held = held.reshape(args.heldout, args.seqlen)
    Hc, Ht = hessians(model, calib, layers), hessians(model, held, layers)
    hessian_s = time.time() - t0
    arch = arch_of(model)
    for fmt, gran, spec in specs:
        t1 = time.time()
        rows = []
        for i in layers:
            for group in arch.sequential:
                key = f"{i}.{group[0]}"
                d = torch.diag(Ht[key])
                keep = d <= args.massive * d.median()
                for name in group:
                    W = blocks(model)[i].get_submodule(name).weight.detach().float()
                    row = {"layer": f"{i}.{name}", "massive_channels": int((~keep).sum()),
                           "diag_max_over_median": (d.max() / d.median()).item()}
                    for solver, kw in SOLVERS.items():
                        if kw is None:
                            Q = fake_quantize(W, spec)
                        elif solver == "spqr":
                            sw = spqr(W, Hc[key], spec, outlier_frac=args.outlier_frac, **kw)
                            Q = sw.dequantize().reshape(W.shape)
                            cols = sw.idx.long() % W.shape[1]
                            row["spqr_outliers"] = {"count": cols.numel(), "on_massive": int((~keep[cols]).sum()),
                                                    "massive_weight_share": (~keep).float().mean().item()}
                        else:
                            qw = gptq(W, Hc[key], spec, **kw)
                            Q = dequantize(qw.codes, qw.qparams, spec).reshape(W.shape)
                        E = W - Q
                        row[solver] = {"calib": rel_objective(E, W, Hc[key]), "heldout": rel_objective(E, W, Ht[key]),
                                       "heldout_bulk": rel_objective(E, W, Ht[key], keep)}
                    rows.append(row)
                    print(f"{spec.describe()} {row['layer']:24s} massive {row['massive_channels']:3d} | " + " | ".join(
                        f"{s} " + " / ".join(f"{1e3 * row[s][k]:6.2f}" for k in ("calib", "heldout", "heldout_bulk"))
                        for s in SOLVERS), flush=True)

        def gmean_ratio(solver: str, k: str) -> float:
            return math.exp(sum(math.log(r[solver][k] / r["rtn"][k]) for r in rows) / len(rows))

        summary = {s: {k: gmean_ratio(s, k) for k in ("calib", "heldout", "heldout_bulk")} for s in SOLVERS if s != "rtn"}
        rec = {"model": model_name(args.model), "spec": spec.describe(), "layers": layers,
               "calibration": f"{args.calib} {args.nsamples}x{args.seqlen}",
               "heldout": f"{args.heldout_data} first {args.heldout} windows",
               "massive_threshold": args.massive, "outlier_frac": args.outlier_frac, "rows": rows, "gptq_over_rtn_geomean": summary,
               "lattice": lattice_check(model, spec, args.seed), "seed": args.seed,
               "threads": torch.get_num_threads(), "hessian_s": hessian_s, "probe_s": time.time() - t1, **meta}
        path = write_json(f"{args.out}/{rec['model']}-{fmt}-{gran}.json", rec)
        print(f"{path}: GPTQ/RTN geometric mean {summary}; lattice {rec['lattice']}", flush=True)


if __name__ == "__main__":
    main()
