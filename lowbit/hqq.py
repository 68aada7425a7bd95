"""HQQ, half-quadratic quantization (Badri & Shaji 2023, mobiusml/hqq; METHODS.md 3.4): data-free.

Per group (one row, or ``g`` consecutive input columns of a row) with the fp16 min-max scale ``s``
fixed, HQQ fits the zero-point ``z`` to a sparsity-promoting ``l_p`` error (``p < 1``), which
tolerates a few large errors (outliers) in exchange for many small ones::

    min_z  || W - s (Q_z(W) - z) ||_p^p,        Q_z(W) = clamp(round(W / s + z), 0, 2^b - 1)

Half-quadratic splitting adds ``W_e`` (the error, kept close to ``W - W_r`` by a quadratic term of
weight ``beta``) and alternates two closed-form steps, from the min-max ``s, z``::

    W_q = Q_z(W);   W_r = s (W_q - z)
    W_e = shrink_p(W - W_r, beta),   shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)
    z   = mean over the group of (W_q - (W - W_e) / s)          # least squares in z
    beta *= kappa

for at most ``iters`` rounds, stopping as soon as ``mean |W - W_r|`` (all groups) stops decreasing.
Each group keeps the best ``(s, z)`` it has seen by the ``l_p`` objective, RTN's min-max grid (integer
``z``) included, so HQQ is never worse than RTN on its own objective. ``optimize_scale=True`` replaces
the z-step by a least-squares line fit of ``W - W_e`` on ``W_q`` per group, which moves ``s`` too.
Groups may be ragged (a short last group): padded positions are left out of every mean.

Zero-points: HQQ keeps ``z`` fractional, stored in fp16: that is ``QuantSpec(zero_point="float")``
(``--zero-point float``), which reproduces the reference. With the default integer zero-point spec,
``z`` is optimised fractional and rounded at the end (to the better of its two integer neighbours in
``[0, 2^b - 1]``), so it is stored in b bits like RTN's; the proximal steps move ``z`` by less than
half a step, so this mostly lands back on RTN's grid (no gain on stories260K).

Rounded start (``round_zero=True``, ``--opt hqq_round_zero=true``): the solver starts from the min-max
``z`` rounded to an integer, i.e. from RTN's grid exactly, instead of the fractional min-max ``z``;
this is the ``hqq`` package's default at 4 bits (``round_zero=True`` in its ``BaseQuantizeConfig`` for
``nbits=4``, False otherwise). Only the start changes: the iterates stay fractional (or are rounded at
the end, as above), and the best-of tracking still includes RTN, so the result is never worse than
RTN on the ``l_p`` objective either.

Settings of the model-level method (``--opt KEY=VALUE``, recorded in ``QuantConfig.extra``):
``hqq_iters`` (20), ``hqq_lp`` (p, 0.7), ``hqq_beta`` (10.0), ``hqq_kappa`` (1.01), ``hqq_round_zero``
(false; a boolean).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .formats import IntFormat
from .granularity import PerChannel, PerGroup, to_groups
from .qmodules import QuantLinear, quant_modules
from .quantize import register
from .quantizer import QParams, QuantizedWeight, QuantSpec, _round_fp16, _round_scale_fp16, compute_qparams, quantize

log = logging.getLogger(__name__)

OPTION_KEYS = {"hqq_iters": ("iters", int), "hqq_lp": ("lp_norm", float), "hqq_beta": ("beta", float),
               "hqq_kappa": ("kappa", float)}


def options(cfg: QuantConfig) -> dict:
    """The keyword arguments of :func:`hqq` given by ``cfg.extra`` (``hqq_*`` keys), checked."""
    opts = {name: typ(cfg.extra[key]) for key, (name, typ) in OPTION_KEYS.items() if key in cfg.extra}
    if "hqq_round_zero" in cfg.extra:
        rz = cfg.extra["hqq_round_zero"]
        if not isinstance(rz, bool):
            raise ValueError(f"hqq_round_zero must be true or false, got {rz!r}")
        opts["round_zero"] = rz
    return opts


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Generalised soft-thresholding ``sign(x) relu(|x| - |x|^(p-1) / beta)`` (0 stays 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def check_spec(spec: QuantSpec) -> None:
    """One-line ValueError unless ``spec`` is an asymmetric integer grid with per-channel/group scales."""
    if not isinstance(spec.fmt, IntFormat) or spec.symmetric:
        raise ValueError(f"HQQ fits the zero-point of an asymmetric integer grid; got {spec.describe()} "
                         "(use e.g. --w-format int4 without --w-sym)")
    if not isinstance(spec.granularity, (PerChannel, PerGroup)):
        raise ValueError(f"HQQ supports per-channel and per-group (g<size>) granularity, "
                         f"not {type(spec.granularity).__name__}")
    if spec.rounding != "nearest":
        raise ValueError("HQQ rounds to nearest; drop stochastic rounding")


def hqq(W: Tensor, spec: QuantSpec, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, optimize_scale: bool = False, early_stop: bool = True,
        round_zero: bool = False) -> QuantizedWeight:
    """Quantize ``W`` with HQQ's half-quadratic proximal solver (see the module docstring);
    ``round_zero``: start from the rounded (integer) min-max zero-point, as the package does at 4 bits."""
    check_spec(spec)
    W = W.detach().float()
    qmax = spec.fmt.qmax
    # min-max (or clip-searched) s and fractional z; with round_zero, RTN's s and integer z (rounded before
    # the fp16 rounding of z, exactly RTN's grid)
    init = compute_qparams(W, replace(spec, zero_point="int" if round_zero else "float"))
    xg, lay = to_groups(W, spec.granularity)
    m = lay.mask(W.device).float()
    cnt = m.sum(-1, keepdim=True)
    n_real = m.sum() * xg.shape[0]
    s, z = init.scale, init.zero

    def lp_error(s: Tensor, z: Tensor) -> Tensor:  # the objective, per group
        Wr = s * (torch.round(xg / s + z).clamp(0, qmax) - z)
        return ((xg - Wr).abs().pow(lp_norm) * m).sum(-1, keepdim=True)

    # per group, the best stored (s, z) so far; the integer-z min-max grid (RTN) is the first candidate
    best_s, best_z = s, torch.round(z).clamp(0, qmax)
    best_e = lp_error(best_s, best_z)
    best_l1 = float("inf")
    for it in range(iters + 1):
        Wq = torch.round(xg / s + z).clamp(0, qmax)
        Wr = s * (Wq - z)
        l1 = float(((xg - Wr).abs() * m).sum() / n_real)
        # integer zero-points: both neighbours of the fractional z are candidates
        cands = [z] if spec.zero_point == "float" else [torch.floor(z).clamp(0, qmax), torch.ceil(z).clamp(0, qmax)]
        for zc in cands:
            e = lp_error(s, zc)
            take = e < best_e
            best_s, best_z = torch.where(take, s, best_s), torch.where(take, zc, best_z)
            best_e = torch.minimum(e, best_e)
        if l1 < best_l1:
            best_l1 = l1
        elif early_stop:
            break
        if it == iters:
            break
        target = xg - shrink_lp(xg - Wr, beta, lp_norm)  # what W_r should reconstruct
        if optimize_scale:  # target ~ s * W_q - s * z, per group
            mq, mt = (Wq * m).sum(-1, keepdim=True) / cnt, (target * m).sum(-1, keepdim=True) / cnt
            dq = (Wq - mq) * m
            cov, var = (dq * (target - mt)).sum(-1, keepdim=True), (dq * dq).sum(-1, keepdim=True)
            s_new = cov / var.clamp_min(1e-12)
            s = torch.where((var > 0) & (s_new > 0), _round_scale_fp16(s_new), s)
            z = mq - mt / s
        else:
            z = ((Wq - target / s) * m).sum(-1, keepdim=True) / cnt
        z = _round_fp16(z)
        beta *= kappa
    qp = QParams(best_s, best_z)
    return QuantizedWeight(quantize(W, qp, spec), qp, spec)


@register("hqq", needs_data=False, kind="solver")
def hqq_method(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> None:
    """HQQ on every quantized Linear not yet frozen, on the device its weight is on (no data)."""
    opts = options(cfg)
    mods = [m for m in quant_modules(model).values()
            if isinstance(m, QuantLinear) and not m.frozen and m.w_spec is not None]
    if mods:
        check_spec(mods[0].w_spec)
    if any(m.w_spec.zero_point == "int" for m in mods):
        log.info("hqq: zero-points are rounded to integers at the end (the reference keeps them in fp16: "
                 "pass --zero-point float to reproduce it)")
    for m in tqdm(mods, desc="hqq", disable=not progress, unit="layer"):
        m.freeze(hqq(m.weight, m.w_spec, **opts))
