"""The quantizer core: ``QuantSpec`` -> ``QParams`` -> codes -> values.

For a group of values ``x`` sharing one scale ``s`` (and zero-point ``z``):

* integer, asymmetric (min-max, GPTQ convention ``min <= 0 <= max``)::

      s = (max x - min x) / (2^b - 1),   z = round(-min x / s),   q = clamp(round(x/s + z), 0, 2^b - 1)
      x_hat = s * (q - z)

* integer, symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``z = 2^(b-1)``, so ``q - z`` lies in
  ``[-2^(b-1), 2^(b-1) - 1]`` and ``max|x|`` is representable. One bit symmetric is binary:
  ``x_hat = s * (+-1)`` with ``s = mean|x|`` (the L2-optimal binary scale).
* table formats (FP8/FP6/FP4, NF4, power-of-two): ``s = max|x| / max(L)``, ``q = argmin_k |x/s - L_k|``,
  ``x_hat = s * L[q]``; values beyond the table saturate.

Scales are stored in fp16 (rounded here, so what is computed is exactly what is stored) or, with
``scale="e8m0"``, as a shared power of two ``2^e`` (OCP MX): ``e = floor(log2 amax) - emax_elem``
("floor", the spec), ``ceil``, ``even`` (amax mantissa rounded first) or ``rceil``
(``ceil(log2(amax / max_elem))``, NVIDIA). GGUF blocks quantize the sub-block scales and mins to
``scale_bits`` bits against one fp16 scale per super-block: ``x_hat = d*sc*q - dmin*m``.

Asymmetric integer specs may keep the zero-point fractional (``zero_point="float"``, as HQQ does):
``z = -min x / s`` is then not rounded but stored in fp16 (16 bits per group instead of b).

BCQ (binary-coding quantization, ``BCQ(q)``): each group has its own ``2^q`` levels
``z + sum_i alpha_i b_i`` (``b_i = +-1``, q fp16 ``alpha`` in ``QParams.scale`` ``(R, G, q)``, the fp16
offset in ``QParams.zero``); the code of a value is its nearest level, bit ``i`` of the code being
``(b_i + 1) / 2``. ``compute_qparams`` fits them (:func:`bcq_fit`): the greedy residual init of
METHODS.md 2.6 (around the mean and around the mid-range) and the min-max uniform grid, each refined
by alternating least-squares ``(alpha, z)`` given the signs and nearest-level signs given
``(alpha, z)``; each group keeps the best.

``fake_quantize(x) == dequantize(quantize(x))`` exactly in the forward pass; its backward is the
straight-through estimator, zero where ``x`` was clipped. ``clip_search`` shrinks each group's
range over a grid (GPTQ's ``mse=True``: ``p = 1 - i/100`` for ``i < 80``) and keeps the ratio with
the least ``sum |x_hat - x|^2.4``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import torch
from torch import Tensor

from .formats import BCQ, Format, FloatFormat, IntFormat, NF4, PowerOfTwo, code_bits, emax, max_value, value_table
from .granularity import (ACT_GRANULARITIES, PEG, GGUFBlock, Granularity, GroupLayout, PerChannel, PerGroup,
                          PerTensor, PerToken, check_fits, num_groups, reduce_dims, to_groups, ungroup)

SCALE_FORMATS = ("fp16", "e8m0")
SCALE_ROUNDINGS = ("floor", "ceil", "even", "rceil")
ROUNDINGS = ("nearest", "stochastic")
ZERO_POINTS = ("int", "float")  # b-bit integer zero-points, or fractional ones stored in fp16
FP16_TINY = 2.0**-24  # smallest fp16 subnormal: no stored scale is smaller


@dataclass(frozen=True)
class QuantSpec:
    """Everything that defines how one tensor is quantized."""

    fmt: Format
    granularity: Granularity = field(default_factory=PerChannel)
    symmetric: bool = False
    scale: str = "fp16"
    scale_rounding: str = "floor"
    rounding: str = "nearest"
    clip_search: bool = False
    zero_point: str = "int"

    def __post_init__(self):
        if not isinstance(self.fmt, IntFormat) and not self.symmetric:
            object.__setattr__(self, "symmetric", True)  # table formats are absmax-scaled
        if self.scale not in SCALE_FORMATS:
            raise ValueError(f"unknown scale format {self.scale!r}; choose one of {SCALE_FORMATS}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"unknown scale rounding {self.scale_rounding!r}; choose one of {SCALE_ROUNDINGS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {ROUNDINGS}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"unknown zero-point kind {self.zero_point!r}; choose one of {ZERO_POINTS}")
        if self.zero_point == "float" and (not isinstance(self.fmt, IntFormat) or self.symmetric
                                           or isinstance(self.granularity, GGUFBlock)):
            raise ValueError("fractional (fp16) zero-points need an asymmetric integer format with fp16 scales, "
                             "not GGUF blocks; drop --zero-point float (or --sym)")
        if isinstance(self.fmt, BCQ):
            if not isinstance(self.granularity, (PerChannel, PerGroup)):
                raise ValueError(f"BCQ supports per-channel and per-group (g<size>) granularity, "
                                 f"not {type(self.granularity).__name__}")
            if self.scale != "fp16" or self.clip_search or self.rounding != "nearest":
                raise ValueError("BCQ fits fp16 scales and rounds to the nearest level; "
                                 "drop e8m0 scales, clip search and stochastic rounding")
        if self.scale == "e8m0" and isinstance(self.fmt, IntFormat) and not self.symmetric:
            raise ValueError("power-of-two (e8m0) scales need a symmetric format; add --sym or use fp16 scales")
        if self.scale == "e8m0" and self.fmt == IntFormat(1):
            raise ValueError("1-bit binary codes cannot use e8m0 scales; use fp16 scales")
        if isinstance(self.granularity, GGUFBlock):
            if not isinstance(self.fmt, IntFormat):
                raise ValueError("GGUF two-level blocks are defined for integer formats only")
            if self.scale == "e8m0" or self.clip_search:
                raise ValueError("GGUF blocks use their own quantized sub-block scales; drop e8m0/clip search")
            if self.fmt.bits == 1 and self.symmetric:
                raise ValueError("GGUF blocks need at least 2 bits when symmetric")

    @property
    def bits(self) -> int:
        return code_bits(self.fmt)

    @property
    def is_uniform(self) -> bool:
        """Integer grid ``s * (q - z)`` (everything but table formats and 1-bit binary)."""
        return isinstance(self.fmt, IntFormat) and not (self.symmetric and self.fmt.bits == 1)

    def levels(self) -> Tensor:
        """Value table of a non-uniform spec."""
        if isinstance(self.fmt, IntFormat):
            return torch.tensor([-1.0, 1.0])  # 1-bit binary
        return value_table(self.fmt)

    def describe(self) -> str:
        from .config import spec_to_str

        return spec_to_str(self)


@dataclass
class QParams:
    """Scales (and zero-points) in the grouped layout ``(R, G, 1)`` or ``(1, G, 1)``; BCQ: ``scale`` holds
    the q alphas ``(R, G, q)`` and ``zero`` the offsets ``(R, G, 1)``."""

    scale: Tensor
    zero: Tensor | None = None
    perm: Tensor | None = None  # PEG permutation of the last dimension
    super_scale: Tensor | None = None  # GGUF: fp16 d per super-block, (R, NS)
    super_min: Tensor | None = None  # GGUF asymmetric: fp16 dmin per super-block

    def to(self, device) -> "QParams":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QParams(mv(self.scale), mv(self.zero), mv(self.perm), mv(self.super_scale), mv(self.super_min))


@dataclass
class QuantizedWeight:
    """A quantized tensor: integer codes (shape of the original), its parameters and spec."""

    codes: Tensor
    qparams: QParams
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.qparams, self.spec).to(dtype)


# ----------------------------------------------------------------------------------------- scales
def _round_scale_fp16(s: Tensor) -> Tensor:
    return s.clamp(FP16_TINY, 65504.0).half().float()


def _round_fp16(t: Tensor) -> Tensor:
    """A value stored in fp16 (zero-points, BCQ scales and offsets), kept as float32."""
    return t.clamp(-65504.0, 65504.0).half().float()


def _floor_log2(a: Tensor) -> Tensor:
    m, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    return (e - 1).float()


def _e8m0(amax: Tensor, spec: QuantSpec) -> Tensor:
    """Shared power-of-two scale per OCP MX v1.0 with the chosen rounding of the exponent."""
    top = max_value(spec.fmt, spec.symmetric)
    em = emax(spec.fmt, spec.symmetric)
    a = amax.clamp_min(2.0**-126)
    fl = _floor_log2(a)
    is_pow2 = torch.frexp(a)[0] == 0.5
    mode = spec.scale_rounding
    if mode == "floor":
        e = fl - em
    elif mode == "ceil":
        e = torch.where(is_pow2, fl, fl + 1) - em
    elif mode == "even":  # round amax to the element's mantissa width first (torchao EVEN)
        mbits = spec.fmt.man if isinstance(spec.fmt, FloatFormat) else max(spec.bits - 2, 0)
        step = torch.exp2(fl - mbits)
        e = _floor_log2(torch.round(a / step) * step) - em
    else:  # rceil
        e = torch.ceil(torch.log2(a / top))
    e = torch.where(amax > 0, e, torch.full_like(e, -127.0)).clamp(-127, 127)
    return torch.exp2(e)


def _gguf_effective(d: Tensor, sc: Tensor, K: int) -> Tensor:
    """Sub-block values ``d * sc`` from per-super-block ``d`` (R, NS) and codes ``sc`` (R, G)."""
    G = sc.shape[1]
    return (d.repeat_interleave(K, dim=1)[:, :G] * sc).unsqueeze(-1)


def _gguf_quantize_scales(v: Tensor, gran: GGUFBlock) -> tuple[Tensor, Tensor]:
    """Quantize non-negative sub-block values ``v`` (R, G, 1) to ``scale_bits`` codes + fp16 super scale."""
    R, G, _ = v.shape
    K = gran.subs_per_super
    top = 2**gran.scale_bits - 1
    vv = torch.nn.functional.pad(v[..., 0], (0, (-G) % K))  # (R, NS*K), zero padding keeps the max
    d = _round_scale_fp16(vv.view(R, -1, K).amax(-1) / top)  # (R, NS)
    codes = torch.round(v[..., 0] / d.repeat_interleave(K, dim=1)[:, :G]).clamp(0, top)
    return d, codes


def _params_from_range(xmin: Tensor, xmax: Tensor, spec: QuantSpec,
                       mean_abs: Tensor | None = None) -> QParams:
    """Scale/zero for each group from its (possibly shrunk) range."""
    fmt = spec.fmt
    gran = spec.granularity
    if spec.is_uniform and not spec.symmetric:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        qmax = fmt.qmax
        if isinstance(gran, GGUFBlock):
            s_raw = (xmax - xmin) / qmax
            d, sc = _gguf_quantize_scales(s_raw, gran)
            sc = sc.clamp_min(1)
            dmin, mc = _gguf_quantize_scales(-xmin, gran)
            K = gran.subs_per_super
            scale = _gguf_effective(d, sc, K)
            zero = _gguf_effective(dmin, mc, K) / scale
            return QParams(scale, zero, super_scale=d, super_min=dmin)
        scale = (xmax - xmin) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = _round_scale_fp16(scale)
        zero = (-xmin / scale).clamp(0, qmax)
        zero = _round_fp16(zero) if spec.zero_point == "float" else torch.round(zero)
        return QParams(scale, zero)
    amax = torch.maximum(xmax.abs(), xmin.abs())
    if not spec.is_uniform and isinstance(fmt, IntFormat):  # 1-bit binary: s = mean|x|
        base = mean_abs
    else:
        base = amax / max_value(fmt, spec.symmetric)
    zero = None
    if spec.is_uniform:
        zero = torch.full_like(base, float(2 ** (fmt.bits - 1)))
    if isinstance(gran, GGUFBlock):
        d, sc = _gguf_quantize_scales(base, gran)
        sc = sc.clamp_min(1)
        return QParams(_gguf_effective(d, sc, gran.subs_per_super), zero, super_scale=d)
    if spec.scale == "e8m0":
        scale = _e8m0(amax, spec)
    else:
        # an all-zero group: any scale gives 0 where the format has a zero code; 1-bit binary has none
        # (values are +-s), so it takes the smallest fp16 scale rather than reconstructing zeros as +-1
        fallback = FP16_TINY if not spec.is_uniform and isinstance(fmt, IntFormat) else 1.0
        scale = torch.where(base > 0, base, torch.full_like(base, fallback))
        scale = _round_scale_fp16(scale)
    return QParams(scale, zero)


# ------------------------------------------------------------------------------------- core ops
def _q_grouped(xg: Tensor, qp: QParams, spec: QuantSpec, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Codes and the 'inside the representable range' mask, in the grouped layout."""
    if isinstance(spec.fmt, BCQ):
        lv = _bcq_levels(qp.scale, qp.zero)
        srt = lv.sort(-1).values
        inside = (xg >= 1.5 * srt[..., :1] - 0.5 * srt[..., 1:2]) & (xg <= 1.5 * srt[..., -1:] - 0.5 * srt[..., -2:-1])
        return _bcq_nearest(xg, lv).to(torch.uint8), inside
    v = xg / qp.scale
    if spec.is_uniform:
        v = v + qp.zero
        qmax = spec.fmt.qmax
        inside = (v >= -0.5) & (v <= qmax + 0.5)
        if spec.rounding == "stochastic":
            v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device))
        else:
            v = torch.round(v)
        return v.clamp(0, qmax).to(torch.uint8), inside
    L = spec.levels().to(xg.device)
    inside = (v >= 1.5 * L[0] - 0.5 * L[1]) & (v <= 1.5 * L[-1] - 0.5 * L[-2])  # half a step past the ends
    if spec.rounding == "stochastic":
        lo = (torch.bucketize(v, L, right=True) - 1).clamp(0, len(L) - 2)
        frac = ((v - L[lo]) / (L[lo + 1] - L[lo])).clamp(0, 1)
        up = torch.rand(v.shape, generator=generator, device=v.device) < frac
        idx = lo + up.long()
    else:
        mids = (L[1:] + L[:-1]) / 2
        idx = torch.bucketize(v, mids)
    return idx.to(torch.uint8), inside


def _dq_grouped(qg: Tensor, qp: QParams, spec: QuantSpec) -> Tensor:
    if isinstance(spec.fmt, BCQ):
        return _bcq_levels(qp.scale, qp.zero).gather(-1, qg.long())
    if spec.is_uniform:
        return qp.scale * (qg.float() - qp.zero)
    L = spec.levels().to(qg.device)
    return qp.scale * L[qg.long()]


def _check_input(x: Tensor, spec: QuantSpec) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot quantize a {tuple(x.shape)} tensor that contains NaN or inf values")
    check_fits(spec.granularity, x.shape)


def compute_qparams(x: Tensor, spec: QuantSpec, perm: Tensor | None = None) -> QParams:
    """Scales and zero-points of ``x`` under ``spec`` (min-max, or MSE-searched with ``clip_search``)."""
    _check_input(x, spec)
    xg, lay = to_groups(x.detach().float(), spec.granularity, perm)
    if isinstance(spec.fmt, BCQ):
        alpha, z, _ = bcq_fit(xg, lay.mask(xg.device), spec.bits)
        return QParams(alpha, z)
    dims = reduce_dims(lay)
    xmin, xmax = xg.amin(dims, keepdim=True), xg.amax(dims, keepdim=True)
    mean_abs = None
    if spec.fmt == IntFormat(1) and spec.symmetric:
        m = lay.mask(xg.device).float()
        mean_abs = (xg.abs() * m).sum(dims, keepdim=True) / m.expand_as(xg).sum(dims, keepdim=True)
    qp = _params_from_range(xmin, xmax, spec, mean_abs)
    if spec.clip_search:
        qp = _clip_search(xg, lay, xmin, xmax, spec, qp, mean_abs)
    qp.perm = lay.perm
    return qp


def _clip_search(xg: Tensor, lay: GroupLayout, xmin: Tensor, xmax: Tensor, spec: QuantSpec, qp: QParams,
                 mean_abs: Tensor | None, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4) -> QParams:
    dims = reduce_dims(lay)
    mask = lay.mask(xg.device).float()
    best = torch.full_like(qp.scale, float("inf"))
    plain = replace(spec, rounding="nearest")
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        cand = _params_from_range(p * xmin, p * xmax, spec, None if mean_abs is None else p * mean_abs)
        q, _ = _q_grouped(xg, cand, plain, None)
        err = ((_dq_grouped(q, cand, spec) - xg).abs().pow(norm) * mask).sum(dims, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        qp.scale = torch.where(better, cand.scale, qp.scale)
        if qp.zero is not None:
            qp.zero = torch.where(better, cand.zero, qp.zero)
    return qp


def quantize(x: Tensor, qp: QParams, spec: QuantSpec, generator: torch.Generator | None = None) -> Tensor:
    """Integer codes (uint8, same shape as ``x``)."""
    _check_input(x, spec)
    xg, lay = to_groups(x.detach().float(), spec.granularity, qp.perm)
    q, _ = _q_grouped(xg, qp, spec, generator)
    return ungroup(q, lay)


def dequantize(codes: Tensor, qp: QParams, spec: QuantSpec) -> Tensor:
    """Values of ``codes`` (float32, same shape)."""
    qg, lay = to_groups(codes, spec.granularity, qp.perm)
    return ungroup(_dq_grouped(qg, qp, spec), lay)


def fake_quantize(x: Tensor, spec: QuantSpec, qp: QParams | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """``dequantize(quantize(x))`` in the forward pass (bit-exact), straight-through in the backward.

    The gradient w.r.t. ``x`` is 1 where ``x`` fell inside the representable range, else 0.
    """
    if qp is None:
        qp = compute_qparams(x, spec)  # checks the input too
    else:
        _check_input(x.detach(), spec)
    xg, lay = to_groups(x.detach().float(), spec.granularity, qp.perm)
    q, inside = _q_grouped(xg, qp, spec, generator)
    y = ungroup(_dq_grouped(q, qp, spec), lay).to(x.dtype)
    if not x.requires_grad:
        return y
    mask = ungroup(inside, lay).to(x.dtype)
    return y + (x - x.detach()) * mask  # exactly y forward; d/dx = mask


def quantize_weight(w: Tensor, spec: QuantSpec, generator: torch.Generator | None = None) -> QuantizedWeight:
    """Round-to-nearest (or stochastic) quantization of one tensor: the RTN solver."""
    qp = compute_qparams(w, spec)
    return QuantizedWeight(quantize(w, qp, spec, generator), qp, spec)


# ------------------------------------------------------------------------------------------- BCQ
@lru_cache(maxsize=None)
def _bcq_signs(q: int, device: torch.device) -> Tensor:
    """``(2^q, q)`` matrix of +-1: row ``c`` holds the signs ``b_i = 2 bit_i(c) - 1`` of code ``c``."""
    c = torch.arange(2**q, device=device)
    return (((c[:, None] >> torch.arange(q, device=device)) & 1) * 2 - 1).float()


def _bcq_levels(alpha: Tensor, z: Tensor) -> Tensor:
    """The ``2^q`` values ``z + sum_i alpha_i b_i`` of each group, ``(R, G, 2^q)`` indexed by code.

    Summed term by term in a fixed order, so quantize and dequantize see bit-identical levels."""
    S = _bcq_signs(alpha.shape[-1], alpha.device)
    lv = z.expand(*alpha.shape[:-1], S.shape[0])
    for i in range(S.shape[1]):
        lv = lv + alpha[..., i:i + 1] * S[:, i]
    return lv


def _bcq_nearest(xg: Tensor, lv: Tensor) -> Tensor:
    """Code (int64) of the level nearest to each value, ties to the lowest code: a value that is a
    level maps back to the code it came from, even where two codes share one level."""
    best_d = (xg - lv[..., :1]).abs()
    code = torch.zeros_like(xg)
    for c in range(1, lv.shape[-1]):  # 2^q <= 16 levels: a running argmin, no (..., g, 2^q) tensor
        d = (xg - lv[..., c:c + 1]).abs()
        code = torch.where(d < best_d, float(c), code)
        best_d = torch.minimum(d, best_d)
    return code.long()


def _bcq_round(alpha: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    # |alpha|: flipping the sign of alpha_i only renames codes, the set of levels is the same
    return _round_fp16(alpha.abs()), _round_fp16(z)


def _bcq_error(xg: Tensor, m: Tensor, codes: Tensor, alpha: Tensor, z: Tensor) -> Tensor:
    lv = _bcq_levels(alpha, z)
    return ((xg - lv.gather(-1, codes)) ** 2 * m).sum(-1, keepdim=True)


def _bcq_range(xg: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    real = m.bool()
    return (torch.where(real, xg, float("inf")).amin(-1, keepdim=True),
            torch.where(real, xg, float("-inf")).amax(-1, keepdim=True))


def _bcq_greedy_init(xg: Tensor, m: Tensor, cnt: Tensor, q: int, center: str = "mean") -> tuple[Tensor, Tensor]:
    """METHODS.md 2.6 with an offset: ``z`` = the group's mean or mid-range, ``r = w - z``; per plane
    ``b_i = sign r``, ``alpha_i = mean |r|``, ``r -= alpha_i b_i``."""
    if center == "mean":
        z = (xg * m).sum(-1, keepdim=True) / cnt
    else:
        lo, hi = _bcq_range(xg, m)
        z = (lo + hi) / 2
    r = xg - z
    alphas = []
    for _ in range(q):
        a = (r.abs() * m).sum(-1, keepdim=True) / cnt
        r = r - a * torch.where(r >= 0, 1.0, -1.0)
        alphas.append(a)
    return torch.cat(alphas, -1), z


def _bcq_uniform_init(xg: Tensor, m: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """The min-max uniform grid written as BCQ (LUT-GEMM): ``alpha_i = 2^(i-1) s / 2``, ``z`` the mid-range."""
    lo, hi = _bcq_range(xg, m)
    s = (hi - lo) / (2**q - 1)
    return torch.cat([s * 2.0 ** (i - 1) for i in range(q)], -1), (lo + hi) / 2


def _bcq_refine(xg: Tensor, m: Tensor, cnt: Tensor, alpha: Tensor, z: Tensor,
                iters: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Alternate least squares for ``(alpha, z)`` given the signs and nearest-level signs given
    ``(alpha, z)``, with fp16 parameters; a round that is worse for a group is not taken there.
    Stops early once a round improves no group (the history is then padded with the final error)."""
    q = alpha.shape[-1]
    L = 2**q
    A = torch.cat([_bcq_signs(q, xg.device), torch.ones(L, 1, device=xg.device)], 1).double()  # (2^q, q+1)
    w, xw = m.expand_as(xg).contiguous(), (xg * m).contiguous()
    alpha, z = _bcq_round(alpha, z)
    codes = _bcq_nearest(xg, _bcq_levels(alpha, z))
    err = _bcq_error(xg, m, codes, alpha, z)
    history = [err]
    for _ in range(iters):
        # normal equations [B 1]^T [B 1] theta = [B 1]^T w from per-code counts and sums:
        # every weight with code c has the row A[c] in [B 1]
        n_c = xg.new_zeros(*xg.shape[:-1], L).scatter_add_(-1, codes, w).double()
        s_c = xg.new_zeros(*xg.shape[:-1], L).scatter_add_(-1, codes, xw).double()
        N = torch.einsum("rgc,ci,cj->rgij", n_c, A, A)
        N.diagonal(dim1=-2, dim2=-1).add_(1e-9 * cnt.double())  # a plane that is constant: singular
        theta = torch.linalg.solve(N, torch.einsum("rgc,ci->rgi", s_c, A)).float()
        a_new, z_new = _bcq_round(theta[..., :q], theta[..., q:])
        c_new = _bcq_nearest(xg, _bcq_levels(a_new, z_new))
        e_new = _bcq_error(xg, m, c_new, a_new, z_new)
        take = e_new <= err  # exact least squares never loses; the fp16 rounding can
        improved = bool((e_new < err).any())
        alpha, z = torch.where(take, a_new, alpha), torch.where(take, z_new, z)
        codes, err = torch.where(take, c_new, codes), torch.where(take, e_new, err)
        history.append(err)
        if not improved:
            break
    return alpha, z, history + [err] * (iters + 1 - len(history))


BCQ_INITS = ("greedy", "greedy_midrange", "uniform")


def bcq_fit(xg: Tensor, mask: Tensor, q: int, iters: int = 10,
            inits: tuple[str, ...] = BCQ_INITS) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Fit BCQ levels to every group of ``xg`` ``(R, G, g)`` (``mask`` ``(1, G, g)``: real positions).

    From each init (``"greedy"``: METHODS.md 2.6's residual fit around the group's mean;
    ``"greedy_midrange"``: the same around its mid-range; ``"uniform"``: the min-max uniform grid,
    which BCQ with an offset represents exactly), ``iters`` alternating rounds: least squares
    for ``(alpha, z)`` given the sign planes ``B`` (a ``(q+1)``-square normal system per group), then
    ``B`` re-assigned to each weight's nearest of the ``2^q`` levels. Each group keeps its best run.
    Parameters are rounded to fp16 as they are stored. Returns ``alpha`` ``(R, G, q)``, ``z``
    ``(R, G, 1)`` and each round's per-group squared error ``(R, G, 1)`` (entry 0: the init), which
    never increases.
    """
    m = mask.float()
    cnt = m.sum(-1, keepdim=True)
    starts = []
    for name in inits:
        if name not in BCQ_INITS:
            raise ValueError(f"unknown BCQ init {name!r}; choose from {BCQ_INITS}")
        starts.append(_bcq_uniform_init(xg, m, q) if name == "uniform" else
                      _bcq_greedy_init(xg, m, cnt, q, "mean" if name == "greedy" else "midrange"))
    k, R = len(starts), xg.shape[0]
    # all runs at once, stacked along the rows
    alpha, z, hist = _bcq_refine(xg.repeat(k, 1, 1), m, cnt, torch.cat([a for a, _ in starts]),
                                 torch.cat([z for _, z in starts]), iters)
    pick = hist[-1].view(k, R, -1, 1).argmin(0, keepdim=True)  # per group, the run that ended best
    sel = lambda t: t.view(k, R, *t.shape[1:]).gather(0, pick.expand(1, R, *t.shape[1:]))[0]  # noqa: E731
    return sel(alpha), sel(z), [h.view(k, R, -1, 1).amin(0) for h in hist]


# ------------------------------------------------------------------------------- bits accounting
def storage_bits(shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> dict[str, int]:
    """Exact bits to store a tensor of ``shape`` quantized with ``spec``: codes, scales, zero-points."""
    numel = math.prod(shape)
    gran = spec.granularity
    if isinstance(gran, ACT_GRANULARITIES) and not isinstance(gran, PerTensor):
        raise ValueError("storage is only defined for weight granularities")
    ng = num_groups(gran, shape)
    codes = numel * spec.bits
    asym_int = spec.is_uniform and not spec.symmetric
    if isinstance(gran, GGUFBlock):
        rows = numel // shape[-1]
        subs = -(-shape[-1] // gran.sub_block)  # sub-blocks per row (last one may be short)
        n_super = rows * -(-subs // gran.subs_per_super)
        scales = ng * gran.scale_bits + n_super * 16
        zeros = (ng * gran.scale_bits + n_super * 16) if asym_int else 0
    elif isinstance(spec.fmt, BCQ):  # q fp16 alphas and one fp16 offset per group
        scales = ng * 16 * spec.bits
        zeros = ng * 16
    else:
        scales = ng * (8 if spec.scale == "e8m0" else 16)
        zeros = ng * (16 if spec.zero_point == "float" else spec.bits) if asym_int else 0
    return {"codes": codes, "scales": scales, "zeros": zeros, "total": codes + scales + zeros, "params": numel}


def qparams_to_tensors(qp: QParams, spec: QuantSpec) -> dict[str, Tensor]:
    """The compact stored form of ``qp`` (what ``storage_bits`` counts), as plain tensors."""
    from .packing import pack_bits

    gran = spec.granularity
    out: dict[str, Tensor] = {}
    if isinstance(gran, GGUFBlock):
        K = gran.subs_per_super
        d = qp.super_scale
        sc = torch.round(qp.scale[..., 0] / d.repeat_interleave(K, 1)[:, : qp.scale.shape[1]])
        out["super_scale"] = d.half()
        out["sub_scale"] = pack_bits(sc.to(torch.uint8), gran.scale_bits)
        if qp.super_min is not None:
            dmin = qp.super_min
            mc = torch.round(qp.zero[..., 0] * qp.scale[..., 0] / dmin.repeat_interleave(K, 1)[:, : qp.scale.shape[1]])
            out["super_min"] = dmin.half()
            out["sub_min"] = pack_bits(mc.to(torch.uint8), gran.scale_bits)
        return out
    if spec.scale == "e8m0":
        out["scale_e8m0"] = (torch.log2(qp.scale) + 127).round().to(torch.uint8)
    else:
        out["scale"] = qp.scale.half()
    if isinstance(spec.fmt, BCQ) or spec.zero_point == "float":
        out["zero"] = qp.zero.half()
    elif spec.is_uniform and not spec.symmetric:
        out["zero"] = pack_bits(qp.zero.to(torch.uint8), spec.bits)
    return out


def qparams_from_tensors(t: dict[str, Tensor], spec: QuantSpec, shape: tuple[int, ...]) -> QParams:
    """Inverse of :func:`qparams_to_tensors` (bit-exact)."""
    from .packing import unpack_bits

    gran = spec.granularity
    if isinstance(gran, GGUFBlock):
        K = gran.subs_per_super
        d = t["super_scale"].float()
        R = d.shape[0]
        G = -(-shape[-1] // gran.sub_block)
        sc = unpack_bits(t["sub_scale"], gran.scale_bits, R * G).view(R, G).float()
        scale = _gguf_effective(d, sc, K)
        zero = None
        dmin = None
        if "super_min" in t:
            dmin = t["super_min"].float()
            mc = unpack_bits(t["sub_min"], gran.scale_bits, R * G).view(R, G).float()
            zero = _gguf_effective(dmin, mc, K) / scale
        elif spec.is_uniform:
            zero = torch.full_like(scale, float(2 ** (spec.fmt.bits - 1)))
        return QParams(scale, zero, super_scale=d, super_min=dmin)
    if "scale_e8m0" in t:
        scale = torch.exp2(t["scale_e8m0"].float() - 127)
    else:
        scale = t["scale"].float()
    zero = None
    if isinstance(spec.fmt, BCQ) or spec.zero_point == "float":
        zero = t["zero"].float().view(*scale.shape[:-1], 1)
    elif spec.is_uniform:
        if spec.symmetric:
            zero = torch.full_like(scale, float(2 ** (spec.fmt.bits - 1)))
        else:
            zero = unpack_bits(t["zero"], spec.bits, scale.numel()).view(scale.shape).float()
    return QParams(scale, zero)


__all__ = [
    "QuantSpec", "QParams", "QuantizedWeight", "compute_qparams", "quantize", "dequantize", "fake_quantize",
    "quantize_weight", "storage_bits", "qparams_to_tensors", "qparams_from_tensors", "bcq_fit",
    "PerTensor", "PerChannel", "PerGroup", "GGUFBlock", "PerToken", "PEG", "NF4", "PowerOfTwo", "FloatFormat",
]
