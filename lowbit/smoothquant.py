"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438), METHODS.md 3.5: migrate activation outliers into
the weights before W8A8 (or W4A8) quantization.

A few input channels of LLM activations are 100x larger than the rest, so a per-token activation
scale wastes most of its grid on them. For each group of Linears sharing an input ``X``, SmoothQuant
divides channel ``j`` of ``X`` by ``s_j`` and multiplies column ``j`` of the weights by it (an exact
transform folded into the previous norm or Linear, :mod:`lowbit.smooth`), with

    s_j = max_t |X_tj|^alpha / max_i |W_ij|^(1 - alpha)

(``max_i`` over the rows of every Linear of the group), which balances the channel's range between
activation and weight; ``alpha = 0.5`` by default (``--opt alpha=0.75`` for models with strong
outliers). Activation maxima come from the calibration batches, block by block on the float model.
Groups: norm -> [q, k, v], norm -> [gate, up], up -> down, and v -> o when there is no GQA.
Channels that never activate (or whose weights are all zero) keep ``s = 1``; the reference code
would clamp them to ``1e-5`` and blow up the norm weight.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .models import arch_of, blocks as blocks_of
from .quantize import register
from .smooth import float_mode, fold_scales, input_stats, quant_mode, rel_error, scale_groups

EPS = 1e-5


def smooth_scales(x_absmax: Tensor, weights: Sequence[Tensor], alpha: float = 0.5) -> Tensor:
    """``s_j = max|X_j|^alpha / max|W_{:,j}|^(1 - alpha)`` (max over all ``weights``), clamped to
    ``[1e-5, 1e5]``; ``s_j = 1`` where either maximum is 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    a = x_absmax.detach().float().to(w_max.device)
    s = a.clamp_min(EPS).pow(alpha) / w_max.clamp_min(EPS).pow(1 - alpha)
    s = torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))
    return s.clamp(EPS, 1 / EPS)


@register("smoothquant", needs_data=True, kind="transform")
def smoothquant_method(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None,
                       progress: bool = True) -> None:
    """Smooth every scale group of every block (float statistics; each block's smoothed float output feeds
    the next). The bar shows the block's quantized-output error (relative MSE vs float) before and after."""
    from .blockwise import capture_inputs, for_each_block, run_block

    alpha = float(cfg.extra.get("alpha", 0.5))
    norm_offset = arch_of(model).norm_offset
    bar = tqdm(total=len(blocks_of(model)), desc="smoothquant", disable=not progress, unit="block")

    with float_mode(model) as specs:
        hidden, kwargs = capture_inputs(model, list(calib.split(1)))
        probe = list(range(min(4, len(hidden))))  # batches on which the bar's error is measured

        def smooth_block(i: int, block: nn.Module, xs: list[Tensor], kw: dict) -> None:
            groups = scale_groups(model, block)
            firsts = sorted({next(iter(g.linears)) for g in groups})
            with input_stats(block, firsts) as stats:
                ref = [run_block(block, x, kw) for x in xs]
            with quant_mode(specs, block):
                before = rel_error([run_block(block, xs[j], kw) for j in probe], [ref[j] for j in probe])
            for g in groups:
                mods = list(g.linears.values())
                s = smooth_scales(stats[next(iter(g.linears))].max_abs, [m.weight for m in mods], alpha)
                fold_scales(g.prev, mods, s, norm_offset)
            with quant_mode(specs, block):
                after = rel_error([run_block(block, xs[j], kw) for j in probe], [ref[j] for j in probe])
            bar.set_postfix({"err_before": f"{before:.2e}", "err_after": f"{after:.2e}"})
            bar.update(1)

        for_each_block(model, hidden, kwargs, smooth_block, on_restore=lambda i, info: bar.update(1))
    bar.close()


__all__ = ["smooth_scales", "smoothquant_method"]
