"""SpQR-style outliers (Dettmers et al. 2023, arXiv 2306.03078): GPTQ with the most sensitive weights
kept in 16 bits as a sparse part.

GPTQ (:mod:`lowbit.gptq`) quantizes column ``i`` and pays, in the layer loss
``||W X - Q X||^2 = tr((W - Q) H (W - Q)^T)``, the amount

    s_ri = (w_ri - q(w_ri))^2 / U_ii^2          (U: upper Cholesky factor of H^-1, in GPTQ's order)

for each weight ``w_ri`` of the column (the rest of its error is absorbed by the later columns). A
weight whose ``s_ri`` is among the largest is an *outlier*: it is stored exactly in fp16, so its error
is 0 (up to fp16 rounding, which is propagated like any other error) and it is left out of its group's
scale statistics, so it no longer widens the grid of its neighbours.

Choosing the outliers (a pre-pass before the GPTQ pass, so that exactly
``k = round(outlier_frac * out * in)`` weights of each layer are kept): the sensitivity of a weight is
its leave-one-out benefit under round-to-nearest,

    b_rj = sum_{l in g} e_rl(stats of g) / U_ll^2  -  sum_{l in g, l != j} e_rl(stats of g \\ {j}) / U_ll^2

(``g``: the group of ``w_rj`` in row ``r``; ``e``: squared RTN error). With min-max statistics removing
a weight changes them only when it is the group's largest or smallest, so ``b_rj = e_rj / U_jj^2``
(the equation above, with the RTN error) for every other weight, and for the two extremes it also
counts how much the rest of the group gains from the narrower range; both are computed exactly. The
``k`` outliers are picked greedily in a few rounds (a global top-k per round, statistics recomputed
without the outliers chosen so far), so that two large weights in one group can both be found.

Storage (COO): per outlier one fp16 value and one int32 flat index ``r * in + c`` into the weight,
48 bits, counted by :func:`lowbit.size.size_report` on top of the dense part, whose codes are still
counted in full. At an outlier position the dense code is the rounding of the outlier's value on its
group's grid (unused: the fp16 value overwrites it), so that re-quantizing the frozen weight with its
qparams gives the dense codes, as :mod:`lowbit.export` expects.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import QuantConfig
from .gptq import _gptq_columns, attn_cache_option, check_spec, inverse_hessian_factor, sequential_solve
from .granularity import PerGroup
from .qmodules import QuantLinear
from .quantize import register
from .quantizer import QuantizedWeight, QuantSpec, compute_qparams, dequantize, quantize

OUTLIER_BITS = 16 + 32  # fp16 value + int32 flat index (COO)
_ROUNDS = 4  # greedy rounds of the outlier pre-pass


class SpQRWeight(NamedTuple):
    """The dense quantized part, and the sparse part: flat indices (int32, ascending) and fp16 values."""

    qw: QuantizedWeight
    idx: Tensor
    values: Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as used at inference: the dense part with the outliers written over it."""
        w = self.qw.dequantize(torch.float32).contiguous()
        w.view(-1)[self.idx.long()] = self.values.float()
        return w.to(dtype)


def _grouped(x: Tensor, gs: int, fill: float) -> Tensor:
    """``(R, C)`` -> ``(R, G, gs)``, the short last group padded with ``fill``."""
    pad = (-x.shape[1]) % gs
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad), fill)], 1)
    return x.view(x.shape[0], -1, gs)


def _weighted_rtn_error(W: Tensor, spec: QuantSpec, inv_d: Tensor) -> Tensor:
    """``(w - rtn(w))^2 / U_jj^2`` of every weight; ``W`` has the excluded weights set to 0."""
    qp = compute_qparams(W, spec)
    return (dequantize(quantize(W, qp, spec), qp, spec) - W).pow(2) * inv_d


def select_outliers(W: Tensor, spec: QuantSpec, u_diag: Tensor, k: int, rounds: int = _ROUNDS) -> Tensor:
    """Boolean mask of the ``k`` weights with the largest leave-one-out RTN sensitivity (module docstring).

    ``u_diag``: ``U_jj`` for each column ``j`` of ``W`` (in ``W``'s column order)."""
    R, C = W.shape
    mask = torch.zeros(R, C, dtype=torch.bool, device=W.device)
    k = min(k, R * C)
    if k <= 0:
        return mask
    gs = spec.granularity.size if isinstance(spec.granularity, PerGroup) else C
    inv_d = (1.0 / u_diag.float().pow(2))[None, :].expand(R, C)
    G = -(-C // gs)
    base = (torch.arange(G, device=W.device) * gs)[None, :]  # first column of each group
    rounds = max(1, min(rounds, k))
    for r in range(rounds):
        take = -(-(k - int(mask.sum())) // (rounds - r))
        Wm = torch.where(mask, torch.zeros_like(W), W)  # zero: outside every min-max range, error 0
        err = _weighted_rtn_error(Wm, spec, inv_d)
        total = _grouped(err, gs, 0.0).sum(-1)  # (R, G)
        benefit = err.clone()
        for fill, pick in ((-float("inf"), torch.argmax), (float("inf"), torch.argmin)):
            cand = _grouped(torch.where(mask, torch.full_like(W, fill), W), gs, fill)
            col = (pick(cand, -1) + base).clamp(max=C - 1)  # (R, G): the group's extreme weight
            Wl = Wm.clone()
            Wl.scatter_(1, col, 0.0)
            rest = _grouped(_weighted_rtn_error(Wl, spec, inv_d), gs, 0.0).sum(-1)
            benefit.scatter_(1, col, total - rest)
        benefit[mask] = -float("inf")
        top = torch.topk(benefit.flatten(), take).indices
        mask.view(-1)[top] = True
    return mask


def spqr(W: Tensor, H: Tensor, spec: QuantSpec, *, outlier_frac: float = 0.01, percdamp: float = 0.01,
         block_size: int = 128, act_order: bool = False) -> SpQRWeight:
    """GPTQ of ``W`` (out, in) given ``H`` (in, in), with ``round(outlier_frac * W.numel())`` weights kept
    in fp16: for each column ``i`` in GPTQ's order,

        q_ri = fp16(w_ri) if (r, i) is an outlier else quant(w_ri);   e_r = (w_ri - q_ri) / U_ii;
        W[r, j>i] -= e_r * U[i, j>i]

    the outliers being those of largest sensitivity ``(w - q(w))^2 / U_ii^2`` (see the module docstring),
    left out of the scale statistics of their group. ``outlier_frac=0`` is exactly :func:`lowbit.gptq.gptq`
    (static groups under ``act_order``)."""
    check_spec(spec, "SpQR")
    if not 0 <= outlier_frac < 1:
        raise ValueError(f"outlier_frac must lie in [0, 1), got {outlier_frac}")
    W, perm, U = inverse_hessian_factor(W, H, percdamp, act_order)
    R, C = W.shape
    u_orig = torch.empty(C, device=W.device)
    u_orig[perm.to(W.device)] = torch.diag(U)  # U_jj of each original column
    mask = select_outliers(W, spec, u_orig, round(outlier_frac * R * C))
    qw, Q = _gptq_columns(W, perm, U, spec, block_size, act_order, None, mask)  # static groups iff act_order
    idx = mask.flatten().nonzero().flatten()
    values = Q.flatten()[idx].half()  # the kept fp16 values (the dense codes there are their rounding)
    return SpQRWeight(qw, idx.to(torch.int32), values)


@register("spqr", needs_data=True, kind="solver")
def spqr_method(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None, progress: bool = True) -> None:
    """SpQR, block by block and true-sequentially (:func:`lowbit.gptq.sequential_solve`). Options from
    ``cfg.extra``: ``outlier_frac`` (0.01), ``percdamp``, ``act_order`` (True, as for GPTQ), ``block_size``."""
    opts = {"act_order": True} | {k: cfg.extra[k] for k in ("outlier_frac", "percdamp", "act_order", "block_size")
                                  if k in cfg.extra}

    def solve(mods: dict[str, QuantLinear], H: torch.Tensor) -> None:
        for m in mods.values():
            res = spqr(m.weight, H, m.w_spec, **opts)
            m.freeze(res.qw)
            m.set_outliers(res.idx, res.values)

    sequential_solve(model, calib, solve, "spqr", progress, attn_cache=attn_cache_option(cfg))
