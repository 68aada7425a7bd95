"""lowbit's PTQ methods side by side with independent implementations from PyPI (issue 3).

Same model, same calibration token ids, same evaluation; one JSON per row under ``--out``
(default ``results/peers``). The peers are NOT lowbit dependencies: run this script with the
python of a separate virtual environment that sees the system's torch/transformers/lowbit and adds
the peers with ``--no-deps`` (the recipe is ``VENV`` below). A plain ``pip install .[peers]`` would
also pull llm-compressor's pins (transformers<=5.17, auto-round, ...) and test another stack.

    P=".venv-peers/bin/python benchmarks/peers.py"
    $P hqq --model stories260k --bits 4,3 --group 32
    $P hqq --model smollm2-135m --bits 4,3 --group 64 --windows 40          # ~6-15 min per row on 1 CPU thread
    $P hqq --model stories260k --bits 4,3 --group 32 --lowbit-round-zero 1  # lowbit from the rounded zero (-rz1)
    $P gptq --model stories260k --bits 4,3 --group 0,32 --act-order 1,0     # group 0 = per-channel
    $P gptq --model stories260k --bits 4,3 --group 0,32 --act-order 1,0 --llmc-sequential-targets Linear
    $P gptq --model stories260k --bits 4,3 --group 0,32 --act-order 1 --seed 1   # (and --seed 2; both peers)
    $P gptq-solver --model stories260k --bits 4,3 --group 0,32 --act-order 1,0   # same W and H for both solvers
    $P gptq-solver --model stories260k --bits 4,3 --group 0,32 --act-order 0 --lowbit-static-groups   # (-static)
    $P gptq --model stories260k --bits 4,3 --group 0,32 --act-order 0 --lowbit-static-groups
    $P gptq-agree --model stories260k --bits 4 --group 32 --act-order 1 --seed 1
    $P refs --model stories260k --bits 4,3 --group 0,32                      # float and lowbit RTN, for context
    $P table

* ``hqq``: data-free. The ``hqq`` package's own optimizer (``hqq.core.quantize.Quantizer.quantize``
  with ``optimize=True``, its defaults ``lp_norm=0.7, beta=10, kappa=1.01, iters=20``, early stop)
  against ``lowbit.hqq.hqq`` with ``zero_point="float"`` (fp16 zero-points, like the package), same
  nbits, group size and ``axis=1`` (groups of consecutive input columns). Both store b-bit codes with
  an fp16 scale and an fp16 zero per group: the package's float32 meta is rounded to fp16 as its
  ``HQQLinear`` does when it moves the meta to ``compute_dtype``; both are dequantized in float32.
  Metrics: per-layer reconstruction error (squared Frobenius and the HQQ objective
  ``sum |W - W_r|^0.7``) summed over every Linear of the decoder blocks, and perplexity after
  replacing each block Linear's weight by the dequantized one.
  Rows whose width is not a multiple of the group (stories260K's down_proj, 172 columns, at g32):
  lowbit uses a short last group (5 x 32 + 12); the package groups the flattened tensor, so its
  groups would straddle rows. We call it on columns [0, 160) with g32 and on [160, 172) with g12,
  which is lowbit's layout exactly (its early stop then runs on each piece separately).
* ``gptq``: llm-compressor's ``GPTQModifier`` through ``oneshot`` (sequential pipeline, one decoder
  layer at a time; the calibration ids come in as a DataLoader, so no tokenizer/dataset download)
  against lowbit's ``gptq`` method, on the SAME token ids, same bits / asymmetric min-max grid /
  fp16 scales / block size 128 / damping 0.01 / act-order (static groups in both). compressed-
  tensors needs every row width to be a multiple of the group size: layers where it is not (the
  down_proj of stories260K at g32) get per-channel scales in BOTH implementations (label ``g32*``).
  Known differences: llm-compressor takes the Hessians of all Linears of a decoder layer in one pass
  over that layer's float weights (``--llmc-sequential-targets Linear`` cuts subgraphs at every
  Linear instead, i.e. true-sequential like lowbit); without act-order lowbit fits each group's scale
  when the solver reaches it (reference GPTQ) while llm-compressor always uses static groups
  (``--lowbit-static-groups``: lowbit rows with ``gptq_static_groups=true``, llm-compressor's choice).
  ``--lowbit-round-zero 1``: lowbit HQQ rows whose solver starts from the rounded zero-point
  (``hqq_round_zero=true``), the package's default start at 4 bits.
  ``gptq-solver`` runs both solvers on the same W and H; ``gptq-agree`` counts identical weights.
  Calibration: 128 windows of 256 tokens (seed 0) from the TinyStories sample WITHOUT its held-out
  last 10% of stories (the evaluation text): drawn from the whole file, 16 of the 128 windows would
  overlap the evaluation stories.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowbit.data import data_dir, eval_ids  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.formats import IntFormat  # noqa: E402
from lowbit.granularity import PerChannel, PerGroup  # noqa: E402
from lowbit.models import arch_of, load_model, model_name  # noqa: E402
from lowbit.quantize import block_linear_filter  # noqa: E402
from lowbit.quantizer import QuantSpec, storage_bits  # noqa: E402
from lowbit.results import format_table, run_metadata, write_json  # noqa: E402

VENV = """\
python3 -m venv --system-site-packages .venv-peers
.venv-peers/bin/pip install --no-deps hqq==0.2.8.post1 llmcompressor==0.14.0.1 compressed-tensors==0.19.0 \\
    termcolor einops loguru datasets 'pyarrow>=24' 'dill<0.4.2' pandas pytz tzdata xxhash \\
    'multiprocess<0.70.20' nvidia-ml-py
"""
LP = 0.7  # HQQ's l_p objective
EVAL = {"stories260k": ("tinystories", 512), "smollm2-135m": ("wikitext2", 2048)}
log = logging.getLogger("peers")


# ----------------------------------------------------------------------------------------- helpers
def pkg_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linears inside the decoder blocks (plain or already swapped for lowbit's QuantLinear)."""
    prefix = arch_of(model).layers + "."
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


def ids_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def bits_per_param(shapes: list[torch.Size], spec_of) -> float:
    """Exact bits/param of the decoder-block Linears (codes + scales + zero-points, lowbit.size rules)."""
    tot = sum(storage_bits(s, spec_of(s))["total"] for s in shapes)
    return tot / sum(math.prod(s) for s in shapes)


def evaluate(model: nn.Module, tok, model_id: str, windows: int | None, out: Path, label: str) -> dict:
    """Perplexity on the model's evaluation text, resumable from ``<label>.partial.json``."""
    ds, seqlen = EVAL[model_id]
    ids = eval_ids(ds, tok, seqlen)
    partial = out / f"{label}.partial.json"
    done, prev = [], 0.0
    if partial.exists():
        old = json.loads(partial.read_text())
        if old.get("windows") == windows:
            done, prev = old["nlls"], old["wall_s"]
            print(f"{label}: resuming after {len(done)} windows", flush=True)
    t0 = time.time()
    save = lambda nlls: write_json(partial, {"windows": windows, "nlls": nlls,  # noqa: E731
                                             "wall_s": prev + time.time() - t0})
    res = perplexity(model, ids, seqlen, windows, progress=False, desc=label, done=done, on_window=save)
    res["wall_s"] += prev
    res["dataset"] = ds
    partial.unlink(missing_ok=True)
    return res


def set_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n, w in weights.items():
            mods[n].weight.copy_(w.to(mods[n].weight.dtype))


# --------------------------------------------------------------------------------------------- HQQ
def hqq_peer(W: torch.Tensor, nbits: int, group: int, round_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``hqq`` package on ``W`` (out, in): (dequantized with fp16 meta, with its float32 meta)."""
    from hqq.core.quantize import Quantizer

    C = W.shape[1]
    full = (C // group) * group
    spans = [(0, full, group)] + ([(full, C, C - full)] if C % group else [])
    fp16, fp32 = [], []
    for a, b, gs in spans:
        Wq, meta = Quantizer.quantize(W[:, a:b].contiguous().float(), nbits=nbits, channel_wise=True,
                                      group_size=gs, optimize=True, round_zero=round_zero, axis=1, bitpack=False,
                                      device="cpu")
        q = Wq.float()
        s, z = meta["scale"].float(), meta["zero"].float()
        fp32.append(((q - z) * s).reshape(meta["shape"]))
        fp16.append(((q - z.half().float()) * s.half().float()).reshape(meta["shape"]))
    return torch.cat(fp16, 1), torch.cat(fp32, 1)


def recon(W: torch.Tensor, Wr: torch.Tensor) -> dict:
    d = (W.double() - Wr.double()).abs()
    return {"fro_sq": float((d * d).sum()), "lp07": float(d.pow(LP).sum()), "w_sq": float((W.double() ** 2).sum())}


def run_hqq(args) -> list[dict]:
    from lowbit.hqq import hqq as lowbit_hqq

    out = Path(args.out)
    meta = run_metadata()
    model, tok = load_model(args.model)
    model.eval()
    lins = block_linears(model)
    W0 = {n: m.weight.detach().clone().float() for n, m in lins}
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        g = int(args.group)
        zp = args.lowbit_zero_point
        spec = QuantSpec(IntFormat(bits), PerGroup(g), zero_point=zp)
        label_base = f"hqq-{model_name(args.model)}-int{bits}-g{g}"
        ragged = sorted({n.split(".")[-1] for n, w in W0.items() if w.shape[1] % g})
        bpp = bits_per_param([w.shape for w in W0.values()], lambda s: spec)
        # the package's own default (hqq_base_quant_config): round_zero=True at 4 bits, False otherwise;
        # it only rounds the zero-point the optimizer STARTS from (the result stays fractional)
        rz = (bits == 4) if args.hqq_round_zero == "default" else bool(int(args.hqq_round_zero))
        lrz = bool(int(args.lowbit_round_zero))  # lowbit's hqq_round_zero (the package's 4-bit start)
        for impl in ("lowbit", "hqq"):
            if ((args.hqq_round_zero != "default" and impl == "lowbit")
                    or ((zp == "int" or lrz) and impl == "hqq")):
                continue  # a variant of one side only
            label = (f"{label_base}-{impl}" + ("" if rz == (bits == 4) or impl == "lowbit" else f"-rz{int(rz)}")
                     + ("-rz1" if impl == "lowbit" and lrz else "")
                     + ("-intzero" if impl == "lowbit" and zp == "int" else ""))
            path = out / f"{label}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                print(f"skip {label} (exists)")
                continue
            t0 = time.time()
            deq, extra = {}, {}
            for n, W in W0.items():
                if impl == "lowbit":
                    deq[n] = lowbit_hqq(W, spec, round_zero=lrz).dequantize()
                else:
                    deq[n], extra[n] = hqq_peer(W, bits, g, rz)
            quant_s = time.time() - t0
            per_layer = [{"name": n, **recon(W0[n], deq[n])} for n in W0]
            rec = {k: sum(p[k] for p in per_layer) for k in ("fro_sq", "lp07", "w_sq")}
            rec["rel_fro_sq"] = rec["fro_sq"] / rec["w_sq"]
            if extra:  # the package's own float32 meta, before the fp16 rounding of storage
                r32 = [recon(W0[n], extra[n]) for n in W0]
                rec["fp32_meta"] = {k: sum(r[k] for r in r32) for k in ("fro_sq", "lp07")}
            check = None
            if impl == "lowbit":  # the model-level method gives the same weights as the per-tensor call
                check = _lowbit_hqq_method_check(args.model, spec, deq, {"hqq_round_zero": True} if lrz else {})
            set_weights(model, deq)
            metric = evaluate(model, tok, args.model, args.windows, out, label)
            set_weights(model, W0)
            r = {
                "model": model_name(args.model), "comparison": "hqq", "method": "HQQ (data-free)", "label": label,
                "implementation": ("lowbit" + (" (rounded-zero start)" if lrz else "")
                                   + (" (integer zero-points)" if zp == "int" else "")) if impl == "lowbit"
                else f"hqq {pkg_version('hqq')}" + (
                    "" if rz == (bits == 4) else f" (round_zero={rz})"),
                "settings": {"nbits": bits, "group_size": g, "axis": 1,
                             "zero_point": "fp16 (fractional)" if spec.zero_point == "float" or impl == "hqq" else
                             f"integer ({bits} bits; optimised fractional, rounded to the better neighbour)",
                             "scale": "fp16", "lp_norm": LP, "beta": 10.0, "kappa": 1.01, "iters": 20,
                             "early_stop": True, "optimize_scale": False,
                             "ragged_rows": (f"{', '.join(ragged)}: width not a multiple of {g}; short last group "
                                             "in both (the package run per column span)") if ragged else None,
                             "call": ("lowbit.hqq.hqq(W, QuantSpec(IntFormat(b), PerGroup(g), zero_point="
                                      f"'{zp}'){', round_zero=True' if lrz else ''})"
                                      if impl == "lowbit" else
                                      "hqq.core.quantize.Quantizer.quantize(W, nbits=b, group_size=g, optimize=True, "
                                      f"axis=1, round_zero={rz}, bitpack=False, device='cpu'); meta -> fp16"),
                             **({"round_zero": rz, "round_zero_is_package_default": rz == (bits == 4)}
                                if impl == "hqq" else {"round_zero": lrz})},
                "quantized": "every Linear in the decoder blocks (weights replaced by the dequantized ones); "
                             "embeddings and head in full precision",
                "calibration": "none (data-free)",
                "bits_per_param_blocks": bpp,
                "recon": rec, "recon_per_layer": per_layer,
                "metrics": {metric["dataset"]: metric}, "ppl": metric["ppl"],
                "windows": f"{metric['windows']}/{metric['windows_total']}",
                "quant_wall_s": quant_s, "eval_wall_s": metric["wall_s"], "seed": args.seed,
                "lowbit_method_check": check,
                "peer_versions": {"hqq": pkg_version("hqq")}, **meta,
            }
            write_json(path, r)
            rows.append(r)
            print(f"{label}: ppl {metric['ppl']:.4f} ({metric['windows']} windows), fro^2 {rec['fro_sq']:.5g}, "
                  f"lp0.7 {rec['lp07']:.6g}, quant {quant_s:.1f}s, eval {metric['wall_s']:.0f}s", flush=True)
    return rows


def _lowbit_hqq_method_check(model_id: str, spec: QuantSpec, deq: dict[str, torch.Tensor],
                             extra: dict | None = None) -> dict:
    """quantize_model(method='hqq') on a fresh model: max |difference| to the per-tensor weights."""
    from lowbit.config import QuantConfig
    from lowbit.quantize import quantize_model

    m, _ = load_model(model_id)
    quantize_model(m, QuantConfig(weight=spec, method="hqq", extra=dict(extra or {})), progress=False)
    mods = dict(m.named_modules())
    diff = max(float((mods[n].weight.detach().float() - w).abs().max()) for n, w in deq.items())
    del m
    return {"max_abs_diff_vs_quantize_model": diff}


# -------------------------------------------------------------------------------------------- GPTQ
def calibration_ids(tok, n: int, seqlen: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Windows from the training stories of the TinyStories sample only (the held-out 10% removed)."""
    from lowbit.calib import calibration_batches, calibration_text_ids
    from lowbit.train import EOT, load_stories, split_stories

    src = data_dir() / "tinystories" / "tinystories_train_head_2MiB.txt"
    train, held = split_stories(load_stories(src), 0.1)
    # how much the whole file's windows would overlap the held-out stories (same draw)
    text = src.read_text(encoding="utf-8")
    cut = text.rfind(held[0])
    whole = calibration_text_ids(str(src), tok)
    held_tok = len(tok.encode(text[:cut], add_bos=True))
    starts = torch.randint(0, whole.numel() - seqlen, (n,), generator=torch.Generator().manual_seed(seed))
    overlap = int(((starts + seqlen) > held_tok).sum())
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "tinystories_train90.txt"
        p.write_text("".join(f"{s}\n{EOT}\n" for s in train), encoding="utf-8")
        ids = calibration_batches(tok, str(p), n=n, seqlen=seqlen, seed=seed)
    info = {"source": f"{src.name}, first {len(train)} of {len(train) + len(held)} stories (the last "
                      f"{len(held)} are the TinyStories evaluation text), each followed by a '{EOT}' line, "
                      "tokenized in one call",
            "nsamples": n, "seqlen": seqlen, "seed": seed, "ids_sha256_16": ids_digest(ids),
            "call": "lowbit.calib.calibration_batches(tok, <train-90% file>, n, seqlen, seed)",
            "whole_file_overlap": f"{overlap}/{n} windows drawn from the whole file would overlap the held-out "
                                  "stories; hence the train-only text, used by both implementations"}
    return ids, info


def _specs(bits: int, group: int, width: int) -> QuantSpec:
    gran = PerGroup(group) if group and width % group == 0 else PerChannel()
    return QuantSpec(IntFormat(bits), gran)


def lowbit_gptq(model_id: str, ids: torch.Tensor, bits: int, group: int, act_order: bool, seed: int,
                static_groups: bool = False):
    from lowbit.config import QuantConfig
    from lowbit.qmodules import QuantLinear, replace_modules
    from lowbit.quantize import get_algorithm

    model, tok = load_model(model_id)
    torch.manual_seed(seed)
    t0 = time.time()
    # per-layer specs (g<group> where the row width allows it, else per-channel), then lowbit's gptq method
    replace_modules(model, lambda m, n: QuantLinear.from_linear(m, _specs(bits, group, m.in_features)),
                    block_linear_filter(model))
    cfg = QuantConfig(weight=_specs(bits, group, group), method="gptq", seed=seed,
                      extra={"act_order": act_order, "percdamp": 0.01, "block_size": 128}
                      | ({"gptq_static_groups": True} if static_groups else {}))
    get_algorithm("gptq")(model, cfg, calib=ids, progress=False)
    return model, tok, time.time() - t0, {"call": "QuantLinear per layer + lowbit gptq method "
                                                  "(block by block, true-sequential)", "extra": cfg.extra}


def llmc_gptq(model_id: str, ids: torch.Tensor, bits: int, group: int, act_order: bool, seed: int,
              sequential_targets: list[str] | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from torch.utils.data import DataLoader

    model, tok = load_model(model_id)
    torch.manual_seed(seed)
    names = {n.rsplit(".", 1)[-1]: m.in_features for n, m in block_linears(model)}
    grouped = sorted(k for k, w in names.items() if group and w % group == 0)
    chan = sorted(k for k in names if k not in grouped)

    def args(strategy: str, **kw) -> QuantizationArgs:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=strategy,
                                actorder="static" if act_order else None, scale_dtype=torch.float16, **kw)

    groups = {}
    if grouped:
        groups["grouped"] = QuantizationScheme(targets=[f"re:.*\\.({'|'.join(grouped)})$"],
                                               weights=args("group", group_size=group))
    if chan:
        groups["channel"] = QuantizationScheme(targets=[f"re:.*\\.({'|'.join(chan)})$"], weights=args("channel"))
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                          actorder="static" if act_order else None)
    data = [{"input_ids": r.unsqueeze(0), "attention_mask": torch.ones(1, r.numel(), dtype=torch.long)} for r in ids]

    class _NoTokenizer:  # the calibration set is already token ids: oneshot needs no processor for a DataLoader
        pass

    t0 = time.time()
    oneshot(model=model, processor=_NoTokenizer(), dataset=DataLoader(data, batch_size=None),
            recipe=recipe, num_calibration_samples=len(data), max_seq_length=ids.shape[1],
            pipeline="sequential", shuffle_calibration_samples=False, sequential_targets=sequential_targets)
    quant_s = time.time() - t0
    # copy the GPTQ weights (already dequantized onto the grid) into a plain float model, and check
    # that they lie on the stored grid: re-quantizing them with the stored scale/zero changes nothing
    from compressed_tensors.quantization import fake_quantize

    qw, off_grid = {}, 0.0
    for n, m in block_linears(model):
        w = m.weight.detach().float()
        a = m.quantization_scheme.weights
        off_grid = max(off_grid, float((fake_quantize(w, m.weight_scale.float(), m.weight_zero_point, a) - w)
                                       .abs().max()))
        qw[n] = w.clone()
    del model
    fresh, tok = load_model(model_id)
    set_weights(fresh, qw)
    info = {"call": "llmcompressor.oneshot(GPTQModifier(config_groups=..., block_size=128, dampening_frac=0.01, "
                    f"actorder={'static' if act_order else None}), pipeline='sequential', dataset=DataLoader(ids)"
                    + (f", sequential_targets={sequential_targets})" if sequential_targets else ")"),
            "sequential_targets": sequential_targets or "default (the decoder layer class)",
            "schemes": {k: v.model_dump(mode="json") for k, v in groups.items()},
            "max_abs_requantize_change": off_grid,
            "note": ("Hessians of all Linears of a decoder layer are taken in one pass with that layer's float "
                     "weights (not true-sequential inside the layer); the next layer sees the quantized outputs")
            if not sequential_targets else
            f"subgraphs cut at {sequential_targets}: each one calibrated and quantized before the next sees "
            "its quantized outputs"}
    return fresh, tok, quant_s, info



def _gptq_settings(args):
    """(group, bits, act_order) for every combination of the comma-separated --group/--bits/--act-order."""
    import itertools

    return itertools.product([int(g) for g in args.group.split(",")], [int(b) for b in args.bits.split(",")],
                             [bool(int(a)) for a in args.act_order.split(",")])


def run_gptq(args) -> list[dict]:
    out = Path(args.out)
    meta = run_metadata()
    _, tok = load_model(args.model)
    ids, calib_info = calibration_ids(tok, args.nsamples, args.calib_seqlen, args.seed)
    rows = []
    for group, bits, act in _gptq_settings(args):
        impls = [("lowbit", lowbit_gptq), ("llmcompressor", llmc_gptq)]
        if args.lowbit_static_groups:  # only lowbit rows with static groups (llm-compressor's choice)
            if act:
                continue  # act-order rows have static groups already
            impls = [("lowbit-static", lambda *a: lowbit_gptq(*a, static_groups=True))]
        if args.llmc_sequential_targets:  # an extra peer row with finer sequential subgraphs
            tg = args.llmc_sequential_targets.split(",")
            impls = [("llmcompressor-seq" + "-".join(t.lower() for t in tg),
                      lambda *a, tg=tg: llmc_gptq(*a, sequential_targets=tg))]
        for impl, fn in impls:
            gl = f"g{group}" if group else "channel"
            seed = f"-seed{args.seed}" if args.seed else ""
            label = f"gptq-{model_name(args.model)}-int{bits}-{gl}-{'act' if act else 'noact'}{seed}-{impl}"
            path = out / f"{label}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                print(f"skip {label} (exists)")
                continue
            model, tok, quant_s, info = fn(args.model, ids, bits, group, act, args.seed)
            model.eval()
            shapes = [m.weight.shape for _, m in block_linears(model)]
            chan_layers = sorted({n.rsplit(".", 1)[-1] for n, m in block_linears(model)
                                  if group and m.in_features % group})
            bpp = bits_per_param(shapes, lambda s: _specs(bits, group, s[1]))
            metric = evaluate(model, tok, args.model, args.windows, out, label)
            r = {
                "model": model_name(args.model), "comparison": "gptq", "method": "GPTQ", "label": label,
                "implementation": {"lowbit": "lowbit", "lowbit-static": "lowbit (static groups)"}.get(impl) or (
                    f"llmcompressor {pkg_version('llmcompressor')}" + (
                        f" (sequential_targets={args.llmc_sequential_targets})"
                        if impl != "llmcompressor" else "")),
                "settings": {"nbits": bits, "granularity": gl + ("*" if chan_layers else ""),
                             "per_channel_layers": chan_layers or None, "symmetric": False,
                             "scale": "fp16", "zero_point": "integer", "act_order": act,
                             "static_groups": act or impl != "lowbit", "percdamp": 0.01, "block_size": 128,
                             **info},
                "quantized": "every Linear in the decoder blocks; embeddings and head in full precision",
                "calibration": calib_info,
                "bits_per_param_blocks": bpp,
                "metrics": {metric["dataset"]: metric}, "ppl": metric["ppl"],
                "windows": f"{metric['windows']}/{metric['windows_total']}",
                "quant_wall_s": quant_s, "eval_wall_s": metric["wall_s"], "seed": args.seed,
                "peer_versions": {p: pkg_version(p) for p in ("llmcompressor", "compressed-tensors")},
                **meta,
            }
            write_json(path, r)
            rows.append(r)
            print(f"{label}: ppl {metric['ppl']:.4f}, quant {quant_s:.1f}s", flush=True)
            del model
    return rows


def float_hessians(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``H = 2/N sum_t x_t x_t^T`` (float64) of every block Linear, from the FLOAT model's inputs."""
    acc: dict[str, list] = {}
    hooks = []
    for n, m in block_linears(model):
        def hook(mod, inp, out, n=n):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            h = acc.setdefault(n, [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0])
            h[0] += 2 * x.T @ x
            h[1] += x.shape[0]
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return {n: h / c for n, (h, c) in acc.items()}


def run_gptq_solver(args) -> list[dict]:
    """The two GPTQ solvers alone: same W, same Hessian (from the float model), same min-max grid."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from lowbit.gptq import gptq as lowbit_solver

    out = Path(args.out)
    meta = run_metadata()
    model, tok = load_model(args.model)
    ids, calib_info = calibration_ids(tok, args.nsamples, args.calib_seqlen, args.seed)
    Hs = float_hessians(model, ids)
    W0 = {n: m.weight.detach().float().clone() for n, m in block_linears(model)}
    rows = []
    for group, bits, act in _gptq_settings(args):
        gl = f"g{group}" if group else "channel"
        static = args.lowbit_static_groups and not act
        if args.lowbit_static_groups and act:
            continue  # act-order rows have static groups already
        label = (f"gptq-solver-{model_name(args.model)}-int{bits}-{gl}-{'act' if act else 'noact'}"
                 + ("-static" if static else ""))
        per_layer, t_lb, t_pc = [], 0.0, 0.0
        for n, W in W0.items():
            H = Hs[n]
            R, C = W.shape
            spec = _specs(bits, group, C)
            t0 = time.time()
            Ql = lowbit_solver(W, H, spec, block_size=128, percdamp=0.01, act_order=act,
                               static_groups=True if static else None).dequantize()
            t_lb += time.time() - t0
            grp = isinstance(spec.granularity, PerGroup)
            qa = QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                                  strategy="group" if grp else "channel", group_size=group if grp else None,
                                  actorder="static" if act else None, scale_dtype=torch.float16)
            Wg = W.reshape(R, C // group, group) if grp else W.reshape(R, 1, C)
            scale, zp = calculate_qparams(Wg.amin(-1), Wg.amax(-1), qa)
            t0 = time.time()
            Qp, _, fallback = quantize_weight(W[None].clone(), H.float()[None].clone(), scale[None], zp[None],
                                              None, qa, blocksize=128, percdamp=0.01)
            t_pc += time.time() - t0
            Qp = Qp[0].float()

            def loss(Q):
                D = (W - Q).double()
                return float(torch.einsum("ij,jk,ik->", D, H, D))
            per_layer.append({"name": n, "lowbit": loss(Ql), "peer": loss(Qp),
                              "same_values": float(((Ql - Qp).abs() <= 1e-6 * W.abs().max()).float().mean()),
                              "peer_rtn_fallback": bool(fallback[0])})
        tot_l, tot_p = sum(p["lowbit"] for p in per_layer), sum(p["peer"] for p in per_layer)
        r = {"model": model_name(args.model), "comparison": "gptq-solver", "label": label,
             "method": "GPTQ solver only (one Linear at a time, same W and H)",
             "implementation": f"lowbit.gptq.gptq vs llmcompressor {pkg_version('llmcompressor')} "
                               "modifiers.gptq.gptq_quantize.quantize_weight",
             "settings": {"nbits": bits, "granularity": gl, "per_channel_layers": sorted(
                 {n.rsplit('.', 1)[-1] for n, w in W0.items() if group and w.shape[1] % group}) or None,
                          "act_order": act, "percdamp": 0.01, "block_size": 128, "scale": "fp16",
                          "zero_point": "integer", "hessian": "float model inputs, every Linear (2/N X X^T)",
                          "lowbit_static_groups": act or static,
                          "note": ("lowbit with gptq_static_groups: both take every group's min-max qparams from "
                                   "the original weight" if static else
                                   "lowbit without act_order fits each group's scale when the solver reaches "
                                   "it (reference GPTQ); llm-compressor always uses the min-max qparams of "
                                   "the original weight (static groups)")},
             "calibration": calib_info,
             "metrics": {"layer_loss_sum": {"lowbit": tot_l, "peer": tot_p},
                         "layers_lowbit_better_or_equal": sum(p["lowbit"] <= p["peer"] * (1 + 1e-9)
                                                              for p in per_layer),
                         "layers": len(per_layer),
                         "same_values_mean": sum(p["same_values"] for p in per_layer) / len(per_layer)},
             "per_layer": per_layer, "solver_wall_s": {"lowbit": t_lb, "peer": t_pc}, "seed": args.seed,
             "peer_versions": {p: pkg_version(p) for p in ("llmcompressor", "compressed-tensors")}, **meta}
        write_json(out / f"{label}.json", r)
        rows.append(r)
        print(f"{label}: sum tr(dW H dW^T) lowbit {tot_l:.6g} vs llm-compressor {tot_p:.6g}; "
              f"lowbit <= peer on {r['metrics']['layers_lowbit_better_or_equal']}/{len(per_layer)} layers; "
              f"identical values {r['metrics']['same_values_mean']:.3f}", flush=True)
    return rows


def run_gptq_agree(args) -> list[dict]:
    """End to end, which share of the quantized weights lowbit and llm-compressor have in common, block by
    block (both sequential pipelines); shows where two runs of the same algorithm drift apart."""
    out = Path(args.out)
    meta = run_metadata()
    _, tok = load_model(args.model)
    ids, calib_info = calibration_ids(tok, args.nsamples, args.calib_seqlen, args.seed)
    rows = []
    for group, bits, act in _gptq_settings(args):
        gl = f"g{group}" if group else "channel"
        label = f"gptq-agree-{model_name(args.model)}-int{bits}-{gl}-{'act' if act else 'noact'}-seed{args.seed}"
        a = dict(block_linears(lowbit_gptq(args.model, ids, bits, group, act, args.seed)[0]))
        peers_ = {"llmcompressor": llmc_gptq(args.model, ids, bits, group, act, args.seed)[0],
                  "llmcompressor (sequential_targets=Linear)":
                      llmc_gptq(args.model, ids, bits, group, act, args.seed, sequential_targets=["Linear"])[0]}
        agree = {}
        for pname, pm in peers_.items():
            b = dict(block_linears(pm))
            agree[pname] = {n: float(((a[n].weight - b[n].weight).abs()
                                      <= 1e-6 * a[n].weight.abs().max()).float().mean()) for n in a}
        r = {"model": model_name(args.model), "comparison": "gptq-agree", "label": label,
             "method": "GPTQ end to end: share of identical quantized weights, lowbit vs each peer run",
             "settings": {"nbits": bits, "granularity": gl, "act_order": act, "percdamp": 0.01,
                          "block_size": 128},
             "calibration": calib_info, "agreement": agree, "seed": args.seed, **meta}
        write_json(out / f"{label}.json", r)
        rows.append(r)
        for pname, ag in agree.items():
            print(f"{label} vs {pname}: " + ", ".join(f"{k.split('.', 3)[2]}.{k.rsplit('.', 1)[1]} {v:.4f}"
                                                       for k, v in ag.items()), flush=True)
    return rows


def run_refs(args) -> list[dict]:
    """Context rows: the float model and lowbit RTN at the same settings (same evaluation)."""
    from lowbit.qmodules import QuantLinear, replace_modules

    out = Path(args.out)
    meta = run_metadata()
    rows = []
    settings = [("fp", None, None)] + [(f"rtn-int{b}-{('g%d' % g) if g else 'channel'}", b, g)
                                       for g in [int(x) for x in args.group.split(",")]
                                       for b in [int(x) for x in args.bits.split(",")]]
    for name, bits, group in settings:
        label = f"ref-{model_name(args.model)}-{name}"
        path = out / f"{label}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        model, tok = load_model(args.model)
        bpp = None
        t0 = time.time()
        if bits:
            replace_modules(model, lambda m, n: QuantLinear.from_linear(m, _specs(bits, group, m.in_features)),
                            block_linear_filter(model))
            for _, m in block_linears(model):
                m.freeze()
            bpp = bits_per_param([m.weight.shape for _, m in block_linears(model)],
                                 lambda s: _specs(bits, group, s[1]))
        quant_s = time.time() - t0
        model.eval()
        metric = evaluate(model, tok, args.model, args.windows, out, label)
        r = {"model": model_name(args.model), "comparison": "reference", "label": label,
             "method": "float" if not bits else "RTN (min-max, integer zero)", "implementation": "lowbit",
             "settings": None if not bits else {
                 "nbits": bits, "group_size": group or "channel", "zero_point": "integer", "scale": "fp16",
                 "per_channel_layers": sorted({n.rsplit(".", 1)[-1] for n, m in block_linears(model)
                                               if group and m.in_features % group}) or None},
             "quantized": "none" if not bits else "every Linear in the decoder blocks; embeddings and head in full "
                                                    "precision",
             "calibration": "none (data-free)", "bits_per_param_blocks": bpp,
             "metrics": {metric["dataset"]: metric}, "ppl": metric["ppl"],
             "windows": f"{metric['windows']}/{metric['windows_total']}", "quant_wall_s": quant_s,
             "eval_wall_s": metric["wall_s"], "seed": args.seed, **meta}
        write_json(path, r)
        rows.append(r)
        print(f"{label}: ppl {metric['ppl']:.4f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- table
def table(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.endswith(".partial.json")]
    lines = []
    for comp in ("hqq", "gptq", "reference"):
        sel = [r for r in rows if r.get("comparison") == comp]
        if not sel:
            continue
        flat = []
        for r in sel:
            s = r.get("settings") or {}
            d = {"model": r["model"], "setting": _setting(r), "implementation": r["implementation"],
                 "ppl": r["ppl"], "windows": r.get("windows", ""),
                 "bits/param": r.get("bits_per_param_blocks") or ""}
            if comp == "hqq":
                d |= {"fro^2": r["recon"]["fro_sq"], "lp0.7": r["recon"]["lp07"], "quant_s": r["quant_wall_s"]}
            if comp == "gptq":
                d |= {"act_order": s.get("act_order"), "calib seed": r["seed"], "quant_s": r["quant_wall_s"]}
            flat.append(d)
        cols = list(flat[0])
        lines += [f"== {comp}", format_table(flat, cols), ""]
    pairs = paired(rows)
    if pairs:
        lines += ["== lowbit - peer, paired over evaluation windows (mean NLL difference; < 0: lowbit better)",
                  format_table(pairs, list(pairs[0])), ""]
    multi = seed_means(rows)
    if multi:
        lines += ["== gptq, mean over calibration seeds (ppl of each seed in brackets)",
                  format_table(multi, list(multi[0])), ""]
    solver = [r for r in rows if r.get("comparison") == "gptq-solver"]
    if solver:
        flat = [{"model": r["model"], "setting": f"int{r['settings']['nbits']} {r['settings']['granularity']}",
                 "act_order": r["settings"]["act_order"],
                 "lowbit static groups": r["settings"].get("lowbit_static_groups", r["settings"]["act_order"]),
                 "lowbit sum tr(dW H dW^T)": r["metrics"]["layer_loss_sum"]["lowbit"],
                 "llmcompressor": r["metrics"]["layer_loss_sum"]["peer"],
                 "layers lowbit <=": f"{r['metrics']['layers_lowbit_better_or_equal']}/{r['metrics']['layers']}",
                 "identical values": r["metrics"]["same_values_mean"]} for r in solver]
        lines += ["== gptq solver alone (same W, same H from the float model)", format_table(flat, list(flat[0])), ""]
    return "\n".join(lines)


def seed_means(rows: list[dict]) -> list[dict]:
    """GPTQ rows run with several calibration seeds: the mean perplexity of each implementation."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("comparison") == "gptq":
            key = (r["model"], _setting(r), r["settings"]["act_order"], r["implementation"])
            groups.setdefault(key, []).append(r)
    out = []
    for (model, setting, act, impl), rs in sorted(groups.items()):
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r["seed"])
        ppl = [r["ppl"] for r in rs]
        out.append({"model": model, "setting": setting + (" act" if act else " noact"), "implementation": impl,
                    "seeds": ",".join(str(r["seed"]) for r in rs), "mean ppl": sum(ppl) / len(ppl),
                    "per seed": "[" + ", ".join(f"{p:.3f}" for p in ppl) + "]"})
    return out


def paired(rows: list[dict]) -> list[dict]:
    """For each lowbit row with a peer row of the same setting: mean and standard error of the
    per-window NLL difference (the windows are the same text in both)."""
    out = []
    by = {r["label"]: r for r in rows if "label" in r}
    for lab, r in sorted(by.items()):
        base = next((lab[: -len(x)] for x in ("lowbit", "lowbit-rz1", "lowbit-static") if lab.endswith("-" + x)), None)
        if r.get("comparison") not in ("hqq", "gptq") or base is None:
            continue  # (integer zero-point rows, -lowbit-intzero, are listed, not paired)
        for plab, p in by.items():
            if (not plab.startswith(base) or plab == lab or plab[len(base):].startswith("seed")
                    or p["implementation"].startswith("lowbit")):
                continue
            (ds, a), = r["metrics"].items()
            b = p["metrics"][ds]
            d = [x - y for x, y in zip(a["window_nlls"], b["window_nlls"])]
            n = len(d)
            mean = sum(d) / n
            se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
            out.append({"model": r["model"], "setting": _setting(r) + ("" if r["comparison"] == "hqq" else
                        (" act" if r["settings"]["act_order"] else " noact")), "seed": r["seed"],
                        "lowbit": r["implementation"], "peer": p["implementation"],
                        "ppl lowbit": a["ppl"], "ppl peer": b["ppl"], "dNLL": mean, "se": se,
                        "verdict": "lowbit better" if mean < -2 * se else ("peer better" if mean > 2 * se
                                                                            else "tie (|d| < 2 se)")})
    return out


def _setting(r: dict) -> str:
    s = r.get("settings") or {}
    if r.get("comparison") == "hqq":
        return f"int{s['nbits']} g{s['group_size']} " + ("int-zero" if s["zero_point"].startswith("integer")
                                                          else "fp16-zero")
    if r.get("comparison") == "gptq":
        return f"int{s['nbits']} {s['granularity']} asym"
    if not s:
        return "fp"
    g = "channel" if s["group_size"] == "channel" else f"g{s['group_size']}" + ("*" if s.get("per_channel_layers") else "")
    return f"int{s['nbits']} {g} asym"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["hqq", "gptq", "gptq-solver", "gptq-agree", "refs", "table"])
    ap.add_argument("--model", default="stories260k", choices=sorted(EVAL))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--group", default="32", help="hqq: one group size; gptq/refs: comma list, 0 = per-channel")
    ap.add_argument("--act-order", default="1", help="gptq: comma list of 1/0")
    ap.add_argument("--windows", type=int, default=None, help="evaluation windows (default: all)")
    ap.add_argument("--hqq-round-zero", default="default", choices=["default", "0", "1"],
                    help="hqq: the package's round_zero (default: its own default, True at 4 bits)")
    ap.add_argument("--lowbit-round-zero", default="0", choices=["0", "1"],
                    help="hqq: 1 = only lowbit rows whose solver starts from the rounded zero-point "
                         "(--opt hqq_round_zero=true, the package's 4-bit default), label suffix -rz1")
    ap.add_argument("--lowbit-zero-point", default="float", choices=["float", "int"],
                    help="hqq: lowbit's zero-points (float = fp16 like the package; int = lowbit's default spec)")
    ap.add_argument("--lowbit-static-groups", action="store_true",
                    help="gptq, gptq-solver: only lowbit rows without act-order and with static groups "
                         "(--opt gptq_static_groups=true, llm-compressor's choice), label suffix -static")
    ap.add_argument("--llmc-sequential-targets", default=None,
                    help="gptq: only llm-compressor rows, with these sequential_targets (e.g. Linear)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "peers"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    if args.what == "hqq":
        run_hqq(args)
    elif args.what == "gptq":
        run_gptq(args)
    elif args.what == "gptq-solver":
        run_gptq_solver(args)
    elif args.what == "gptq-agree":
        run_gptq_agree(args)
    elif args.what == "refs":
        run_refs(args)
    print(table(Path(args.out)))


if __name__ == "__main__":
    main()
