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

``fake_quantize(x) == dequantize(quantize(x))`` exactly in the forward pass; its backward is the
straight-through estimator, zero where ``x`` was clipped. ``clip_search`` shrinks each group's
range over a grid (GPTQ's ``mse=True``: ``p = 1 - i/100`` for ``i < 80``) and keeps the ratio with
the least ``sum |x_hat - x|^2.4``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .formats import Format, FloatFormat, IntFormat, NF4, PowerOfTwo, code_bits, emax, max_value, value_table
from .granularity import (ACT_GRANULARITIES, PEG, GGUFBlock, Granularity, GroupLayout, PerChannel, PerGroup,
                          PerTensor, PerToken, check_fits, num_groups, reduce_dims, to_groups, ungroup)

SCALE_FORMATS = ("fp16", "e8m0")
SCALE_ROUNDINGS = ("floor", "ceil", "even", "rceil")
ROUNDINGS = ("nearest", "stochastic")
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

    def __post_init__(self):
        if not isinstance(self.fmt, IntFormat) and not self.symmetric:
            object.__setattr__(self, "symmetric", True)  # table formats are absmax-scaled
        if self.scale not in SCALE_FORMATS:
            raise ValueError(f"unknown scale format {self.scale!r}; choose one of {SCALE_FORMATS}")
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise ValueError(f"unknown scale rounding {self.scale_rounding!r}; choose one of {SCALE_ROUNDINGS}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; choose one of {ROUNDINGS}")
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
    """Scales (and zero-points) in the grouped layout ``(R, G, 1)`` or ``(1, G, 1)``."""

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
        zero = torch.round(-xmin / scale).clamp(0, qmax)
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
    else:
        scales = ng * (8 if spec.scale == "e8m0" else 16)
        zeros = ng * spec.bits if asym_int else 0
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
    if spec.is_uniform and not spec.symmetric:
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
    if spec.is_uniform:
        if spec.symmetric:
            zero = torch.full_like(scale, float(2 ** (spec.fmt.bits - 1)))
        else:
            zero = unpack_bits(t["zero"], spec.bits, scale.numel()).view(scale.shape).float()
    return QParams(scale, zero)


__all__ = [
    "QuantSpec", "QParams", "QuantizedWeight", "compute_qparams", "quantize", "dequantize", "fake_quantize",
    "quantize_weight", "storage_bits", "qparams_to_tensors", "qparams_from_tensors",
    "PerTensor", "PerChannel", "PerGroup", "GGUFBlock", "PerToken", "PEG", "NF4", "PowerOfTwo", "FloatFormat",
]
