"""Do the GGUF files lowbit writes run in llama.cpp, and does llama.cpp compute the same model?

For every weight spec that has a ggml block type, RTN-quantize the model with lowbit, write the GGUF
(`lowbit.export_gguf`: lowbit's own codes and scales), load it in llama.cpp through llama-cpp-python, and
score the same token ids, window by window, in both: lowbit's PyTorch forward (fp32, weights dequantized)
and llama.cpp's (its quantized dot products, which also round the activations to 8 bits for Q4/Q5/Q8
weights). A wrong byte layout or a wrong Q/K row order shows as a perplexity far off lowbit's; matching
kernels agree to a fraction of a percent. Also: llama.cpp's tokenizer read from the file against lowbit's
on the evaluation text, and the file size against lowbit's own size report.

    pip install llama-cpp-python        # builds llama.cpp from source (a few minutes on 2 cores)
    python benchmarks/gguf_llamacpp.py --model smollm2-135m --windows 8 --out results/gguf_llamacpp

One JSON record per spec under ``--out`` (commit, versions, wall times); ``benchmarks/report.py`` tabulates them.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lowbit import QuantConfig, export_gguf, load_model, parse_spec
from lowbit.gguf_export import check_exportable
from lowbit.data import eval_ids, load_text
from lowbit.eval import default_seqlen, perplexity
from lowbit.quantize import quantize_model
from lowbit.results import run_metadata, write_json
from lowbit.size import size_report

# label -> (format, granularity, symmetric); None = the float model written in f16
SPECS = {
    "f16": None,
    "int8-g32-sym": ("int8", "g32", True),  # Q8_0
    "int4-g32-sym": ("int4", "g32", True),  # Q4_0
    "int4-g32": ("int4", "g32", False),  # Q4_1
    "int5-g32-sym": ("int5", "g32", True),  # Q5_0
    "int4-gguf": ("int4", "gguf", False),  # Q4_K (rows of whole 256-value super-blocks only)
    "int5-gguf": ("int5", "gguf", False),  # Q5_K
    "int6-gguf-sym": ("int6", "gguf", True),  # Q6_K
}


def llamacpp_nlls(path: Path, ids: torch.Tensor, seqlen: int, windows: int, threads: int):
    """llama.cpp's mean NLL per non-overlapping window of ``ids`` (the same windows as lowbit.eval.perplexity),
    its logits of the first window, and the loaded ``Llama`` (for its tokenizer)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=seqlen, n_batch=512, n_ubatch=512, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    nlls, first = [], None
    for i in range(windows):
        x = ids[i * seqlen:(i + 1) * seqlen].tolist()
        llm.reset()
        llm.eval(x)
        logits = np.array(llm.scores[:seqlen - 1], dtype=np.float64)  # position t predicts token t + 1
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nlls.append(float(np.mean(lse - logits[np.arange(seqlen - 1), x[1:]])))
        if first is None:
            first = logits.astype(np.float32)
    return nlls, first, llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="wikitext2")
    ap.add_argument("--windows", type=int, default=8, help="windows of the dataset scored in both runtimes")
    ap.add_argument("--seqlen", type=int, default=None, help="window length (default: 2048 or the model's context)")
    ap.add_argument("--specs", default=",".join(SPECS), help=f"comma-separated, from: {', '.join(SPECS)}")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default="results/gguf_llamacpp")
    ap.add_argument("--gguf-dir", default="runs/gguf_llamacpp", help="where the GGUF files are written")
    a = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("gguf_llamacpp: error: llama-cpp-python is not installed; pip install llama-cpp-python "
                 "(it builds llama.cpp from source)")
    torch.set_num_threads(a.threads)
    labels = [s.strip() for s in a.specs.split(",") if s.strip()]
    bad = [s for s in labels if s not in SPECS]
    if bad:
        sys.exit(f"gguf_llamacpp: error: unknown spec {bad[0]!r}; known: {', '.join(SPECS)}")
    out, gdir = Path(a.out), Path(a.gguf_dir)
    gdir.mkdir(parents=True, exist_ok=True)
    for label in labels:
        t0 = time.time()
        model, tok = load_model(a.model)
        seqlen = default_seqlen(model, a.seqlen)
        ids = eval_ids(a.dataset, tok, seqlen)
        spec = SPECS[label]
        cfg = None
        if spec is not None:
            cfg = QuantConfig(weight=parse_spec(spec[0], spec[1], symmetric=spec[2]))
            try:  # e.g. k-quants need rows of whole 256-value super-blocks (SmolLM2's 576 are not)
                check_exportable(model, cfg)
            except ValueError as e:
                print(f"{label}: skipped, this model cannot take it: {e}")
                continue
            quantize_model(model, cfg)
        size = size_report(model)
        with torch.inference_mode():
            mine = perplexity(model, ids, seqlen, max_windows=a.windows, desc=f"lowbit {label}")
            ref = model(ids[:seqlen].unsqueeze(0), use_cache=False).logits[0, :-1].float().numpy()
        t_lowbit = time.time() - t0
        path = gdir / f"{Path(str(a.model)).name}-{label}.gguf"
        t1 = time.time()
        rep = export_gguf(model, tok, path)
        t_export = time.time() - t1
        t2 = time.time()
        nlls, first, llm = llamacpp_nlls(path, ids, seqlen, mine["windows"], a.threads)
        t_llama = time.time() - t2
        # the file's tokenizer against lowbit's, on the start of the evaluation text (no BOS on either side)
        text = load_text(a.dataset)[:20000]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        ours = tok.encode(text, add_bos=False)
        same = sum(x == y for x, y in zip(theirs, ours))
        prefix = next((i for i, (x, y) in enumerate(zip(theirs, ours)) if x != y), min(len(theirs), len(ours)))
        del llm
        ppl_l = math.exp(sum(nlls) / len(nlls))
        record = {
            "model": str(a.model), "label": label, "dataset": a.dataset, "seqlen": seqlen,
            "windows": mine["windows"], "weight": None if spec is None else cfg.weight.describe(),
            "ggml_types": sorted(set(rep["tensors"].values())), "gguf_bytes": rep["bytes"],
            "lowbit_model_bytes": size["model_megabytes"] * 2 ** 20,
            "blocks_bits_per_param": size["blocks_bits_per_param"],
            "max_abs_err_vs_lowbit_weights": max(rep["max_abs_err"].values(), default=0.0),
            "ppl_lowbit": mine["ppl"], "ppl_llamacpp": ppl_l, "ppl_ratio": ppl_l / mine["ppl"],
            "window_nlls_lowbit": mine["window_nlls"], "window_nlls_llamacpp": nlls,
            "first_window_max_abs_logit_diff": float(np.abs(first - ref).max()),
            "first_window_top1_agreement": float((first.argmax(-1) == ref.argmax(-1)).mean()),
            "tokenizer_ids_compared": min(len(theirs), len(ours)), "tokenizer_ids_equal": same,
            "tokenizer_identical_prefix": prefix, "tokenizer_lengths": [len(theirs), len(ours)],
            "llama_cpp_python": llama_cpp.__version__, "threads": a.threads,
            "wall_s": {"lowbit_quantize_and_eval": t_lowbit, "export": t_export, "llamacpp_load_and_eval": t_llama},
        } | run_metadata()
        write_json(out / f"{Path(str(a.model)).name}-{label}.json", record)
        print(f"{label}: {record['ggml_types']} lowbit ppl {mine['ppl']:.3f}, llama.cpp {ppl_l:.3f} "
              f"(x{ppl_l / mine['ppl']:.4f}); top-1 agreement {record['first_window_top1_agreement']:.3f}; "
              f"tokenizer {same}/{record['tokenizer_ids_compared']} ids equal; {rep['bytes'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
