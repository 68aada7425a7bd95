"""Where 4-bit per-token activations break a model: the inputs of each block's Linears, measured on the float model.

Per-token symmetric quantization gives every token one scale, ``max_j |x_j| / (2^(b-1) - 1)``: a token whose
largest entry is far above the rest keeps that entry and rounds the others to zero. For each decoder block this
probe runs the float model on the first WikiText-2 windows and reports, for the input of the attention
projections (after ``input_layernorm``) and of ``down_proj`` (the SwiGLU product),

* the largest ``|x|``, and the largest ratio of a token's ``max |x_j|`` to its RMS (how peaked a token is);
* the per-token quantizer's error at ``--a-bits`` (fake quantization as lowbit applies it): the mean over tokens
  of ``||Q(x_t) - x_t|| / ||x_t||``, and for ``down_proj`` the largest entry of the error that writes into the
  residual stream, ``|(Q(x) - x) W^T|``; each on the input as it is and after an orthogonal Hadamard-type
  rotation of its width (:func:`lowbit.hadamard.rotation_matrix`), the kind QuaRot applies there (the residual
  rotation for the attention input, the online Hadamard for ``down_proj``'s), which spreads a huge entry over all;
* the largest ``|h|`` of the residual stream after the block (the *massive activations*).

OmniQuant's equivalent transformation (LET) smooths the norm -> q/k/v and norm -> gate/up inputs only: on
LLaMA-style blocks nothing smooths ``down_proj``'s input (the reference code has no LET there either).

    OMP_NUM_THREADS=1 python benchmarks/act_probe.py --model smollm2-135m --windows 2 --out results/act_probe
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from lowbit.config import parse_spec
from lowbit.data import eval_ids
from lowbit.hadamard import rotation_matrix
from lowbit.models import arch_of, blocks, load_model, model_name
from lowbit.quantizer import fake_quantize
from lowbit.results import run_metadata, write_json


def token_stats(x: Tensor, spec, weight: Tensor | None = None, seed: int = 0) -> dict:
    """Peak statistics of ``x`` (tokens, channels) and the per-token quantizer's error, plain and rotated:
    the mean over tokens of ``||Q(x_t) - x_t|| / ||x_t||`` and, given the consumer's ``weight`` (out, in), the
    largest entry of the error it writes into the consumer's output, ``|(Q(x) - x) W^T|`` (for a rotation R,
    ``Q(x R) R^T - x``: the weight is rotated too, ``W R``, and the product unchanged)."""
    x = x.reshape(-1, x.shape[-1]).float()
    norm = x.norm(dim=-1).clamp(min=1e-12)
    rms = norm / x.shape[-1] ** 0.5
    out = {"max_abs": x.abs().max().item(), "max_peak_to_rms": (x.abs().amax(-1) / rms).max().item()}
    R = rotation_matrix(x.shape[-1], seed).float()  # orthogonal: R^-1 = R^T
    xr = x @ R
    for tag, err in (("", fake_quantize(x, spec) - x), ("_rotated", (fake_quantize(xr, spec) - xr) @ R.T)):
        out["rel_err" + tag] = (err.norm(dim=-1) / norm).mean().item()
        if weight is not None:
            out["out_err_max" + tag] = (err @ weight.float().T).abs().max().item()
    return out


def probe(model, ids: Tensor, spec, seed: int = 0) -> list[dict]:
    """One record per decoder block: statistics of the attention and down_proj inputs, residual stream peak."""
    arch = arch_of(model)
    rows: list[dict] = [{"block": i} for i in range(len(blocks(model)))]
    hooks = []

    def keep(i: int, key: str, x: Tensor) -> None:  # the inputs of every window; statistics once all ran
        rows[i].setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]))

    for i, blk in enumerate(blocks(model)):
        for key, name in (("attn_in", arch.attn[0]), ("down_in", arch.mlp[-1])):
            hooks.append(blk.get_submodule(name).register_forward_pre_hook(
                lambda m, args, i=i, key=key: keep(i, key, args[0])))
        hooks.append(blk.register_forward_hook(
            lambda m, args, out, i=i: rows[i].__setitem__("resid_max_abs", max(
                rows[i].get("resid_max_abs", 0.0), (out[0] if isinstance(out, tuple) else out).abs().max().item()))))
    try:
        with torch.no_grad():
            for w in ids:
                model(w[None])
    finally:
        for h in hooks:
            h.remove()
    for r in rows:
        for key in ("attn_in", "down_in"):
            r[key] = token_stats(torch.cat(r[key]), spec, blocks(model)[r["block"]].get_submodule(
                arch.mlp[-1]).weight if key == "down_in" else None, seed)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--windows", type=int, default=2, help="first evaluation windows to run")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--a-bits", type=int, default=4, help="per-token symmetric integer activations")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rotation (where a random one stands in)")
    ap.add_argument("--out", default="results/act_probe")
    args = ap.parse_args()
    t0 = time.time()
    model, tok = load_model(args.model)[:2]
    model.eval()
    flat = eval_ids(args.dataset, tok, args.seqlen)
    n = min(args.windows, flat.numel() // args.seqlen)
    ids = flat[: n * args.seqlen].view(n, args.seqlen)
    spec = parse_spec(f"int{args.a_bits}", "token", symmetric=True)
    rows = probe(model, ids, spec, args.seed)
    rec = {"model": model_name(args.model), "dataset": args.dataset, "windows": int(ids.shape[0]),
           "seqlen": args.seqlen, "act_spec": f"int{args.a_bits} token sym", "blocks": rows, "seed": args.seed,
           "wall_s": time.time() - t0,
           "threads": torch.get_num_threads(), **run_metadata()}
    path = write_json(f"{args.out}/{rec['model']}-a{args.a_bits}.json", rec)
    worst = max(rows, key=lambda r: r["down_in"]["out_err_max"])
    print(f"{path}: down_proj's int{args.a_bits} input writes the largest error into the residual stream in block "
          f"{worst['block']}: {worst['down_in']['out_err_max']:.1f} (rotated {worst['down_in']['out_err_max_rotated']:.1f}; "
          f"residual max |h| {worst['resid_max_abs']:.0f})")


if __name__ == "__main__":
    main()
