"""``lowbit`` command line: subcommands that mirror the Python API one to one.

    lowbit quantize MODEL --w-format int4 --w-granularity g128 --eval wikitext2 --out out/m-w4g128
    lowbit eval MODEL --tasks wikitext2,c4,kl --fp-model MODEL
    lowbit generate MODEL --prompt "Once upon a time"
    lowbit train --data stories.txt --tokenizer tok512.model --out runs/s260k
    lowbit info MODEL
    lowbit export-gguf out/m-w4g32 m-w4g32.gguf
    lowbit gen-data MODEL --out data/s260k-self --n-sequences 1024 --seq-len 256 --topk-logits 32

Bad input ends with one line ``lowbit: error: ...`` and exit status 2 (set ``LOWBIT_DEBUG=1`` for
the traceback).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time

from .config import FORMAT_NAMES, GRANULARITY_NAMES, QuantConfig, parse_spec

log = logging.getLogger("lowbit")


def _parse_opts(items: list[str]) -> dict:
    """``["alpha=0.5", "epochs=2", "act_order=true"]`` -> typed dict (int, float, bool or str)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--opt {it!r}: expected KEY=VALUE, e.g. --opt alpha=0.5")
        k, v = (t.strip() for t in it.split("=", 1))
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        for typ in (int, float):
            try:
                out[k] = typ(v)
                break
            except ValueError:
                pass
        else:
            out[k] = v
    return out


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if name.startswith("cuda"):  # fp32 means fp32: no TF32 in matmuls (reproducible Hessians, fair perplexity)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return name


def _processes(a) -> str:
    """The device of this process. Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group first
    (:func:`lowbit.distributed.init`: gloo on CPU, nccl and ``cuda:LOCAL_RANK`` on GPUs) and every rank but 0
    goes quiet (no progress bars, warnings only)."""
    from . import distributed

    device = distributed.init(_device(a.device))
    if not distributed.is_main():
        a.quiet = True
        logging.getLogger().setLevel(logging.WARNING)
    elif distributed.world_size() > 1 and not {"dfqat", "mixed"} & set(getattr(a, "method", "dfqat").split(",")):
        log.warning("%d processes: only dfqat training (and --calib self) splits its work; the others repeat it",
                    distributed.world_size())
    return device


def _is_main() -> bool:
    from . import distributed

    return distributed.is_main()


def _load_in_turn(load_model, a):
    """``load_model(a.model)``; with several processes rank 0 loads first (it may write the GGUF cache), the
    others once it has."""
    from . import distributed

    if not distributed.is_main():
        distributed.barrier()
    out = load_model(a.model, tokenizer=a.tokenizer)
    if distributed.is_main():
        distributed.barrier()
    return out


# ------------------------------------------------------------------------------------ arguments
def _add_spec_args(p: argparse.ArgumentParser, prefix: str, what: str, default_gran: str | None,
                   sym_flag: str = "sym") -> None:
    g = p.add_argument_group(f"{what} quantization")
    g.add_argument(f"--{prefix}-format", default=None,
                   help=f"number format for {what} ({', '.join(FORMAT_NAMES)}); omit to keep {what} in float")
    g.add_argument(f"--{prefix}-granularity", default=None,
                   help=f"{', '.join(GRANULARITY_NAMES)} (default {default_gran or 'per format'})")
    if sym_flag == "sym":
        g.add_argument(f"--{prefix}-sym", action="store_true", help="symmetric integer grid (default asymmetric)")
    else:
        g.add_argument(f"--{prefix}-asym", action="store_true", help="asymmetric integer grid (default symmetric)")
    if prefix == "w":
        g.add_argument("--scale", default=None, choices=["fp16", "e8m0"], help="how scales are stored (default fp16)")
        g.add_argument("--scale-rounding", default="floor", choices=["floor", "ceil", "even", "rceil"],
                       help="exponent rounding of e8m0 (MX) scales")
        g.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"])
        g.add_argument("--clip-search", action="store_true", help="MSE search of the clipping range per group")
        g.add_argument("--zero-point", default="int", choices=["int", "float"],
                       help="asymmetric int zero-points: b-bit integers (default) or fractional, stored in fp16 "
                            "(HQQ's choice)")


def _spec_from_args(a: argparse.Namespace, prefix: str, default_gran: str | None):
    fmt = getattr(a, f"{prefix}_format")
    if fmt is None:
        return None
    gran = getattr(a, f"{prefix}_granularity") or (default_gran if not fmt.lower().startswith(("mx", "bfp")) else None)
    sym = getattr(a, f"{prefix}_sym", None)
    if sym is None:
        sym = not getattr(a, f"{prefix}_asym")
    if prefix == "w":
        return parse_spec(fmt, gran, symmetric=sym, scale=a.scale, scale_rounding=a.scale_rounding,
                          rounding=a.rounding, clip_search=a.clip_search, zero_point=a.zero_point)
    return parse_spec(fmt, gran, symmetric=sym)


def _kv_spec_from_args(a: argparse.Namespace, model):
    """The KV-cache spec of ``--kv``/``--kv-granularity``/``--kv-asym``; ``head`` becomes ``g<head width>``."""
    if a.kv_format is None:
        if a.kv_granularity or a.kv_asym:
            raise ValueError("--kv-granularity and --kv-asym need a KV-cache format, e.g. --kv int4")
        return None
    gran = (a.kv_granularity or "token").strip().lower()
    if gran == "head":
        from .models import head_dim

        gran = f"g{head_dim(model)}"
    if a.kv_format.strip().lower().startswith(("mx", "bfp")) and not a.kv_granularity:
        gran = None  # the preset's own block of 32
    try:
        return parse_spec(a.kv_format, gran, symmetric=not a.kv_asym)
    except ValueError as e:
        raise ValueError(f"--kv {a.kv_format}{' --kv-granularity ' + a.kv_granularity if a.kv_granularity else ''}: "
                         f"{e}") from None


def _add_eval_args(p: argparse.ArgumentParser, default_tasks: str | None) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks" if default_tasks else "--eval", dest="tasks", default=default_tasks,
                   help="comma-separated: wikitext2, c4, ptb, tinystories, a text file, kl (fidelity to the float model)")
    g.add_argument("--seqlen", type=int, default=None, help="window length (default min(2048, model context))")
    g.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default all)")
    g.add_argument("--json", default=None, help="write the result record to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize Hugging Face causal LMs, with or without data.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model (and optionally evaluate and save it)")
    q.add_argument("model", help="short name (stories260k, smollm2-135m), folder, .gguf, llama2.c .bin or hub id")
    q.add_argument("--method", default="rtn",
                   help="rtn, gptq, awq, hqq, omniquant, spqr, bcq, dfqat (data-free QAT), mixed (learned per-channel "
                        "bit-widths, --target-bits), or a recipe of transforms "
                        "then one solver, "
                        "e.g. quarot,gptq or smoothquant,rtn (default rtn)")
    q.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="--method mixed: the size budget in bits per parameter of the decoder blocks (metadata "
                        "included), e.g. 3.0")
    q.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method setting, repeatable (e.g. --opt alpha=0.5 --opt epochs=20); recorded in the config")
    q.add_argument("--tokenizer", default=None, help="tokenizer path, if not beside the model")
    _add_spec_args(q, "w", "weights", "channel")
    _add_spec_args(q, "a", "activations", "token", sym_flag="asym")
    k = q.add_argument_group("KV-cache quantization (outputs of the key/value projections, before RoPE)")
    kv_formats = ", ".join(f for f in FORMAT_NAMES if not f.startswith("bcq"))
    k.add_argument("--kv", "--kv-format", dest="kv_format", default=None,
                   help=f"number format of the cached keys and values ({kv_formats}); omit to keep the KV cache "
                        "in float")
    k.add_argument("--kv-granularity", default=None,
                   help="token (default: one scale per token over all heads, as LLM-QAT), head (per token and head), "
                        "or g<size> (per token and run of size channels)")
    k.add_argument("--kv-asym", action="store_true", help="asymmetric integer grid (default symmetric)")
    _add_spec_args(q, "embed", "embeddings", "channel")
    _add_spec_args(q, "head", "head", "channel")
    c = q.add_argument_group("calibration (methods that use data, e.g. gptq)")
    c.add_argument("--calib", default=None,
                   help="c4 (documents 1100+ of the C4 sample), a text file, or 'self' (text the float model "
                        "generates: no data); default c4, self for dfqat (its training data; --opt "
                        "dfqat_data=FOLDER trains on a gen-data folder instead)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    c.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default: the eval seqlen)")
    c.add_argument("--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean(diag H)")
    c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ/SpQR: columns by decreasing Hessian diagonal, static groups (default on)")
    q.add_argument("--skip", default="", help="comma-separated Linear names inside a block to keep in float, e.g. mlp.down_proj")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    q.add_argument("--out", default=None, help="save the quantized model to this folder")
    q.add_argument("--ckpt", default=None, metavar="FOLDER",
                   help="checkpoint folder: the block-by-block methods (gptq, awq, smoothquant, omniquant, spqr) "
                        "save every finished block, dfqat and mixed every tile and N steps; the same command "
                        "continues a killed run there")
    q.add_argument("--save-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the tensors that stay unquantized in the saved folder")
    q.add_argument("--gguf", default=None, metavar="PATH",
                   help="also write a GGUF file for llama.cpp with lowbit's own codes and scales (after --out); "
                        "lowbit export-gguf has the options")
    q.add_argument("--eval-fp", action="store_true", help="also evaluate the float model (before/after table)")
    _add_eval_args(q, None)

    e = sub.add_parser("eval", help="perplexity and fidelity of a model or a lowbit folder")
    e.add_argument("model")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--fp-model", default=None, help="float reference for the kl task")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto", help="cpu, cuda ... (default: cuda when available)")
    _add_eval_args(e, "wikitext2")

    g = sub.add_parser("generate", help="sample text from a model")
    g.add_argument("model")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--prompt", default="", help="empty: start from BOS")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train a small Llama-style LM from scratch (Stage 0)")
    _add_dataclass_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")

    d = sub.add_parser("gen-data", help="self-generated token sequences (and teacher top-k logits) for "
                                        "data-free QAT/KD, resumable")
    d.add_argument("model")
    d.add_argument("--tokenizer", default=None)
    d.add_argument("--out", required=True, help="folder for the shards and meta.json (re-run to continue)")
    d.add_argument("--n-sequences", type=int, required=True)
    d.add_argument("--seq-len", type=int, required=True, help="ids per sequence, BOS included")
    d.add_argument("--batch-size", type=int, default=16, help="sequences generated together (ids do not depend on it)")
    d.add_argument("--shard-size", type=int, default=256, help="sequences per shard file")
    d.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--top-k", type=int, default=50, help="0 = off")
    d.add_argument("--greedy-prefix", type=int, default=3, help="greedy tokens after the random first token")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--topk-logits", type=int, default=0, metavar="K",
                   help="also store the teacher's top-K logits and log-sum-exp per position (0 = ids only)")
    d.add_argument("--device", default="auto", help="cpu, cuda ... (default: cuda when available)")

    x = sub.add_parser("export-gguf", help="write a (lowbit-quantized) Llama as a GGUF file for llama.cpp")
    x.add_argument("model", help="a folder saved by lowbit quantize --out, or any model lowbit loads")
    x.add_argument("out", help="the .gguf file to write")
    x.add_argument("--requantize", default=None, choices=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "f32"],
                   help="opt in: weights whose spec has no exact GGUF block type are re-quantized to this type "
                        "(lossy; f32 stores them dequantized, exact) instead of refused")
    x.add_argument("--float-type", default="f16", choices=["f16", "f32"],
                   help="unquantized weights (norms are always f32)")
    x.add_argument("--source-gguf", default=None,
                   help="GGUF file to copy the tokenizer metadata from (default: the one the model came from, if any)")
    x.add_argument("--tokenizer", default=None)
    x.add_argument("--json", default=None, help="write the export report to this JSON file")

    i = sub.add_parser("info", help="parameters and stored bits per part of a model")
    i.add_argument("model")
    i.add_argument("--tokenizer", default=None)
    i.add_argument("--json", default=None)
    return ap


def _add_dataclass_args(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        elif isinstance(default, tuple):
            p.add_argument(flag, type=float, nargs=len(default), default=default)
        elif default is None:
            typ = int if "int" in str(f.type) else None  # e.g. stop_after: int | None
            p.add_argument(flag, default=None, type=typ, required=f.name in ("data", "tokenizer", "out"))
        else:
            p.add_argument(flag, type=type(default), default=default)


# ------------------------------------------------------------------------------------- commands
def _tasks(a) -> list[str]:
    return [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else []


def _print_results(label: str, res: dict, bits: dict | None = None) -> None:
    from .results import format_table

    rows = []
    for task, r in res.items():
        row = {"model": label, "task": task}
        if "ppl" in r:
            row |= {"ppl": r["ppl"], "windows": f"{r['windows']}/{r['windows_total']}", "seqlen": r["seqlen"]}
        else:
            row |= {"kl": r["kl"], "top1_agree": r["top1_agreement"]}
        if bits:
            row |= {"bits/param blocks": bits["blocks_bits_per_param"], "bits/param model": bits["model_bits_per_param"]}
        rows.append(row)
    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    print(format_table(rows, cols))


def cmd_quantize(a) -> dict:
    from .eval import evaluate
    from .export import save_quantized
    from .models import load_model, model_name
    from .quantize import needs_calibration, quantize_model, recipe_steps, validate_config
    from .results import run_metadata, write_json
    from .size import size_report

    cfg = QuantConfig(weight=_spec_from_args(a, "w", "channel"), act=_spec_from_args(a, "a", "token"),
                      embed=_spec_from_args(a, "embed", "channel"), head=_spec_from_args(a, "head", "channel"),
                      method=a.method, seed=a.seed, skip=tuple(s for s in a.skip.split(",") if s),
                      extra=_parse_opts(a.opt))
    if a.target_bits is not None:
        if "mixed" not in recipe_steps(cfg.method):
            raise ValueError("--target-bits is the budget of --method mixed; add --method mixed or drop it")
        cfg.extra["mixed_target_bits"] = a.target_bits
    if "mixed" in recipe_steps(cfg.method) and cfg.weight is None:  # the widths are learned: an int8 container
        from .mixed import container

        g = (a.w_granularity or "channel").strip().lower()
        if g != "channel" and not (g.startswith("g") and g[1:].isdigit() and int(g[1:]) > 0):
            raise ValueError(f"--method mixed takes --w-granularity channel or gN (a scale per N columns), got {g!r}")
        cfg.weight = container(0 if g == "channel" else int(g[1:]))
    device = _processes(a)
    main = _is_main()  # under torchrun only rank 0 evaluates, prints and writes
    model, tok = _load_in_turn(load_model, a)
    cfg.kv = _kv_spec_from_args(a, model)
    validate_config(model, cfg)  # fail before any evaluation
    if a.gguf:
        from .gguf_export import check_exportable

        check_exportable(model, cfg)  # and before quantizing, when the result could not be written
    model.to(device)
    tasks = _tasks(a) if main else []
    fp_model = copy.deepcopy(model) if (a.eval_fp or "kl" in tasks) and main else None
    record = {"model": model_name(a.model), "method": cfg.method, "config": cfg.to_dict(), "seed": a.seed,
              "calibration": "none (data-free)"}
    if a.eval_fp and tasks:
        fp_tasks = [t for t in tasks if t != "kl"]
        record["fp_metrics"] = evaluate(fp_model, tok, fp_tasks, a.seqlen, a.max_windows, progress=not a.quiet)
        _print_results(f"{model_name(a.model)} (float)", record["fp_metrics"], size_report(fp_model))
    calib = None
    if needs_calibration(cfg.method):
        from .calib import calibration_batches
        from .eval import default_seqlen

        cl = a.calib_seqlen or default_seqlen(model, a.seqlen)
        dfqat = bool({"dfqat", "mixed"} & set(recipe_steps(cfg.method)))  # QAT methods: self-generated by default
        source, nsamples = a.calib or ("self" if dfqat else "c4"), a.nsamples
        if dfqat and cfg.extra.get("dfqat_data"):  # a gen-data folder: its ids are the training data
            from .datafree import load_dataset

            source = str(cfg.extra["dfqat_data"])
            calib = load_dataset(source).ids
            nsamples, cl = (int(n) for n in calib.shape)
        else:
            calib = calibration_batches(tok, source, nsamples, cl, seed=a.seed, model=model, progress=not a.quiet)
        if {"gptq", "spqr"} & set(recipe_steps(cfg.method)):  # the Hessian solvers' CLI flags
            cfg.extra = {"percdamp": a.percdamp, "act_order": a.act_order} | cfg.extra
        record["calibration"] = {"source": source, "nsamples": nsamples, "seqlen": cl, "seed": a.seed}
    if a.ckpt and {"dfqat", "mixed"} & set(recipe_steps(cfg.method)):
        cfg.extra.setdefault("dfqat_ckpt", a.ckpt)
    record["config"] = cfg.to_dict()
    t0 = time.time()
    quantize_model(model, cfg, calib=calib, progress=not a.quiet, ckpt=a.ckpt)
    record["quant_wall_s"] = time.time() - t0  # this run's share when it resumed from --ckpt
    if getattr(model, "ptq_resume", None):
        record["ptq_resume"] = model.ptq_resume
    if not main:
        return record
    if getattr(model, "dfqat_report", None) is not None:  # per tile / end-to-end losses, seconds, steps
        record["dfqat_report"] = model.dfqat_report
    if getattr(model, "mixed_report", None) is not None:  # budget trace, integer bits, where the bits went
        record["mixed_report"] = model.mixed_report
    rep = size_report(model)
    record["bits"] = rep
    if tasks:
        record["metrics"] = evaluate(model, tok, tasks, a.seqlen, a.max_windows, fp_model=fp_model, seed=a.seed,
                                     progress=not a.quiet)
        _print_results(f"{model_name(a.model)} ({cfg.describe()})", record["metrics"], rep)
    else:
        from .size import format_size_report

        print(format_size_report(rep))
    if a.out:
        save_quantized(model, a.out, tok, float_dtype=getattr(__import__("torch"), a.save_dtype),
                       extra={"base_model": str(a.model)})
        print(f"saved to {a.out}")
    if a.gguf:
        from .gguf_export import export_gguf, format_report

        record["gguf"] = export_gguf(model, tok, a.gguf, name=model_name(a.model))
        print(format_report(record["gguf"]))
    record |= run_metadata()
    if a.json:
        write_json(a.json, record)
    return record


def cmd_eval(a) -> dict:
    from .eval import evaluate
    from .models import load_model, model_name
    from .results import run_metadata, write_json
    from .size import size_report

    device = _device(a.device)
    model, tok = load_model(a.model, tokenizer=a.tokenizer)
    model.to(device)
    fp_model = load_model(a.fp_model)[0].to(device) if a.fp_model else None
    res = evaluate(model, tok, _tasks(a), a.seqlen, a.max_windows, fp_model=fp_model, seed=a.seed,
                   progress=not a.quiet)
    rep = size_report(model)
    _print_results(model_name(a.model), res, rep)
    record = {"model": model_name(a.model), "metrics": res, "bits": rep, "seed": a.seed, **run_metadata()}
    if a.json:
        write_json(a.json, record)
    return record


def cmd_generate(a) -> None:
    from .generate import generate
    from .models import load_model

    model, tok = load_model(a.model, tokenizer=a.tokenizer)
    text = generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_p=a.top_p, seed=a.seed)
    print(a.prompt + text)


def cmd_train(a) -> dict:
    from .train import TrainConfig, train

    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    res = train(TrainConfig(**kw), resume=a.resume, progress=not a.quiet)
    print(json.dumps({k: v for k, v in res.items() if k != "losses"}, indent=1))
    return res


def cmd_info(a) -> dict:
    from .models import load_model, tied_embeddings
    from .results import write_json
    from .size import format_size_report, size_report

    model, _ = load_model(a.model, tokenizer=a.tokenizer)
    rep = size_report(model)
    cfg = getattr(model, "lowbit_config", None)
    print(f"{a.model}: {model.config.architectures[0]}, {rep['model_params']:,} parameters, "
          f"tied embeddings: {tied_embeddings(model)}" + (f", lowbit: {cfg.describe()}" if cfg else ""))
    print(format_size_report(rep))
    if a.json:
        write_json(a.json, rep)
    return rep


def _base_gguf(name: str):
    """The GGUF a lowbit folder's base model was loaded from (``base_model`` in quant_config.json), if any."""
    from pathlib import Path

    from .models import resolve

    try:
        p = Path(resolve(name))
        if (p / "quant_config.json").is_file():
            base = json.loads((p / "quant_config.json").read_text()).get("base_model")
            p = Path(resolve(base)) if base else p
    except (FileNotFoundError, ValueError, OSError):
        return None
    return p if p.suffix == ".gguf" and p.is_file() else None


def cmd_export_gguf(a) -> dict:
    from .gguf_export import export_gguf, format_report
    from .models import load_model, model_name
    from .results import write_json

    model, tok = load_model(a.model, tokenizer=a.tokenizer)
    src = a.source_gguf or (None if a.tokenizer else _base_gguf(a.model))
    rep = export_gguf(model, tok, a.out, source_gguf=src, float_type=a.float_type, requantize=a.requantize,
                      name=None if src else model_name(a.model))
    print(format_report(rep))
    for name, why in rep["lossy"].items():
        print(f"  lossy: {name}: {why}")
    if a.json:
        write_json(a.json, rep)
    return rep


def cmd_gen_data(a) -> dict:
    from .datafree import format_stats, generate_dataset
    from .models import load_model, model_name

    device = _processes(a)
    model, tok = _load_in_turn(load_model, a)
    model.to(device)
    meta = generate_dataset(model, tok, a.out, n_sequences=a.n_sequences, seq_len=a.seq_len, batch_size=a.batch_size,
                            shard_size=a.shard_size, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            greedy_prefix=a.greedy_prefix, seed=a.seed, topk_logits=a.topk_logits,
                            progress=not a.quiet, model_name=model_name(a.model))
    if not _is_main():
        return meta
    call = meta["calls"][-1]
    speed = f", {call['tokens_per_s']:,.0f} tokens/s" if call["tokens_per_s"] else ""
    print(f"{a.out}: {meta['n_sequences']:,} sequences x {a.seq_len} ids in {len(meta['shards'])} shard(s); "
          f"generated {call['sequences_generated']:,} now in {call['wall_s']:.1f} s{speed}")
    print("diversity:\n" + format_stats(meta["diversity"]))
    return meta


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "train": cmd_train, "info": cmd_info,
            "gen-data": cmd_gen_data, "export-gguf": cmd_export_gguf}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lowbit draws its own bars; keep stderr for errors
    hf_logging.set_verbosity_error()
    from . import distributed

    try:
        COMMANDS[args.cmd](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError, KeyError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f" (rank {distributed.rank()})" if distributed.rank() else ""
        print(f"lowbit: error{where}: {msg}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()  # the process group that _processes() joined, if any
    return 0


if __name__ == "__main__":
    sys.exit(main())
