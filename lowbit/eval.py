"""Evaluation: perplexity with the GPTQ protocol, and data-free fidelity to the float model.

Perplexity (METHODS.md section 8.1): the evaluation text is tokenized in one call, cut into
non-overlapping windows of ``seqlen`` tokens (the tail is dropped), and

    ppl = exp( mean over windows of  mean_{t=1..seqlen-1}  -log p(x_t | x_<t) )

which is GPTQ's ``exp(sum(nll_window * seqlen) / (n * seqlen))``. Every window's NLL is returned,
so a prefix of the split can be scored again without running the model.

Fidelity needs no data: the float model writes ``n`` sequences (see :mod:`lowbit.sampling`) and
both models score them; we report the token-mean ``KL(p_fp || p_q)`` and how often their top-1
predictions agree (the llama.cpp ``--kl-divergence`` style).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import eval_ids
from .models import max_context
from .sampling import sample_ids
from .tokenizer import Tokenizer


@torch.inference_mode()
def perplexity(model: nn.Module, ids: Tensor, seqlen: int, max_windows: int | None = None,
               progress: bool = True, desc: str = "ppl", done: list[float] | None = None,
               on_window: Callable[[list[float]], None] | None = None) -> dict:
    """Perplexity of ``model`` on 1-D ``ids`` over non-overlapping ``seqlen`` windows.

    Resumable: ``done`` holds the NLLs of windows already scored (they are not run again) and
    ``on_window(nlls)`` is called after every window, e.g. to save progress.
    """
    total = ids.numel() // seqlen
    if total == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = min(total, max_windows) if max_windows else total
    device = next(model.parameters()).device
    nlls = list(done or [])[:n]
    t0 = time.time()
    bar = tqdm(range(len(nlls), n), desc=desc, disable=not progress, unit="win", initial=len(nlls), total=n)
    for i in bar:
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, x[0, 1:]).item())
        bar.set_postfix(ppl=f"{math.exp(sum(nlls) / len(nlls)):.3f}")
        if on_window is not None:
            on_window(nlls)
    nll = sum(nlls) / n
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "windows_total": total, "seqlen": seqlen,
            "tokens": n * seqlen, "window_nlls": nlls, "wall_s": time.time() - t0,
            "windows_resumed": len(done or [])}


@torch.inference_mode()
def fidelity(fp_model: nn.Module, q_model: nn.Module, tok: Tokenizer, n: int = 8, length: int = 256,
             seed: int = 0, batch_size: int = 4, progress: bool = True) -> dict:
    """KL(p_fp || p_q) and top-1 agreement on text the float model generates itself."""
    vocab = min(tok.vocab_size, fp_model.config.vocab_size)
    # first tokens must be ids both the tokenizer and the model have
    pool = torch.tensor(sorted(set(range(vocab)) - tok.special_ids()))
    kl_sum, agree, count = 0.0, 0, 0
    t0 = time.time()
    for b in tqdm(range(0, n, batch_size), desc="fidelity", disable=not progress, unit="batch"):
        m = min(batch_size, n - b)
        ids = sample_ids(fp_model, m, length, seed=seed * 7919 + b, bos_id=tok.bos_id, first_token_pool=pool,
                         greedy_prefix=0, vocab_size=vocab)
        device = next(q_model.parameters()).device
        lp = F.log_softmax(fp_model(ids.to(next(fp_model.parameters()).device)).logits[..., :vocab].float(), -1)
        lq = F.log_softmax(q_model(ids.to(device)).logits[..., :vocab].float(), -1).to(lp.device)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # (m, length)
        kl_sum += kl.sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        count += kl.numel()
    return {"kl": kl_sum / count, "top1_agreement": agree / count, "sequences": n, "length": length,
            "seed": seed, "wall_s": time.time() - t0}


def default_seqlen(model: nn.Module, requested: int | None = None) -> int:
    """2048 (the papers' convention) unless the model's context is shorter."""
    return requested or min(2048, max_context(model))


def evaluate(model: nn.Module, tok: Tokenizer, tasks: list[str] | tuple[str, ...] = ("wikitext2",),
             seqlen: int | None = None, max_windows: int | None = None, fp_model: nn.Module | None = None,
             seed: int = 0, progress: bool = True) -> dict:
    """Run perplexity tasks (``wikitext2``, ``c4``, ``ptb``, ``tinystories`` or a text file path) and,
    with ``fp_model`` and the task ``kl``, data-free fidelity. Returns ``{task: result}``."""
    seqlen = default_seqlen(model, seqlen)
    out = {}
    for task in tasks:
        if task == "kl":
            if fp_model is None:
                raise ValueError("the 'kl' task compares with the float model; it needs fp_model")
            out[task] = fidelity(fp_model, model, tok, seed=seed, progress=progress)
            continue
        ids = eval_ids(task, tok, seqlen)
        out[task] = perplexity(model, ids, seqlen, max_windows, progress=progress, desc=task)
    return out
