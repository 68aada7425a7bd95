"""Learnable weight quantizers for QAT, on lowbit's exact stored grid.

Every quantizer here is an ``nn.Module`` built from ``(weight, spec)`` (its parameters are initialised
from the weight) with one interface:

* ``forward(w) -> w_hat``: the fake-quantized weight, differentiable: rounding is straight-through
  (STE), the gradient w.r.t. ``w`` is 1 inside the representable range and 0 where ``w`` is clipped,
  and the learnable parameters get the gradient of their paper;
* ``qparams(w) -> QParams`` and ``quantized_weight(w) -> QuantizedWeight``: the same grid as lowbit
  stores it (fp16-exact scales; integer zero-points for asymmetric INT, fp16 ones with
  ``zero_point="float"``), so that
  ``forward(w) == dequantize(quantize(w, qparams(w)))`` bit for bit, and a ``QuantLinear`` frozen with
  ``quantized_weight(w)`` computes exactly what the live one computed and exports losslessly.

To keep the forward value bit-exact, every STE is written ``value + (x - x.detach())``: the forward
value is exactly ``value`` (``x - x`` is exactly 0) and the gradient is that of ``x``.

The quantizers (``make_quantizer(kind, weight, spec)``):

* ``"ste"`` :class:`MinMaxSTE` (LLM-QAT): no parameters; min-max qparams (or the MSE clip search if the
  spec asks for it) recomputed from the current weight at every call, STE. Any lowbit weight spec that
  rounds to nearest.
* ``"lsq"`` :class:`LSQ` (Esser et al. 2019): one learnable scale ``s`` per group. Integer grid
  ``w_hat = s (clamp(round(w/s + z), 0, 2^b - 1) - z)`` (symmetric: ``z = 2^(b-1)``; asymmetric: ``z`` is the
  min-max zero-point of the initial weight, fixed), or a table format ``w_hat = s L[nearest(w/s)]``.
  Gradients (METHODS.md 1.4): ``dw_hat/ds = round(v) - v`` inside (``v = w/s + z``), the clipped level
  ``-z`` or ``2^b - 1 - z`` outside, times ``g = 1/sqrt(N Q_P)`` per group, ``N`` the number of real weights in
  the group (a ragged last group has fewer) and ``Q_P`` the number of positive levels (``2^(b-1) - 1``
  symmetric, ``2^b - 1`` asymmetric, the positive table entries for table formats).
  Initialisation: ``init="minmax"`` (default) takes lowbit's own min-max qparams (the MSE clip search
  too, if the spec asks for it), so a fresh LSQ is exactly RTN and QAT starts from the PTQ baseline;
  ``init="lsq"`` is the paper's ``s = 2 mean|w| / sqrt(Q_P)`` (designed for training from scratch).
  With Adam the per-group gradient scale ``g`` is largely normalised away (Adam divides by the gradient's
  running RMS), so a scale's step is about the learning rate in the scale's own units: pick the
  quantizer learning rate relative to the scales (about 1e-2 of them is a lively start).
* ``"lsq+"`` :class:`LSQPlus` (Bhalgat et al. 2020): LSQ plus a learnable zero-point (asymmetric INT
  only). LSQ+'s offset ``beta`` is ``-s z`` here with ``z`` rounded to an integer in ``[0, 2^b - 1]``
  (straight-through; fp16-rounded instead when the spec has ``zero_point="float"``), because that is
  what lowbit stores. As in LSQ+, the offset only receives gradient from clipped weights
  (``dw_hat/dz = -s`` there, 0 inside); it is scaled by the same ``g``. The parameter is the offset in weight
  units, ``offset = s0 z`` (``s0`` the initial scale, fixed), as LSQ+'s ``beta`` is: an optimizer step then
  moves ``z`` by about ``lr / s0`` levels (a zero-point learned in integer units moves ``lr`` levels a step,
  and at QAT learning rates its rounded value never changes: LSQ+ was then LSQ to every digit).
* ``"lwc"`` :class:`LWC` (OmniQuant): sigmoid-parametrised clipping of each group's min and max,
  :class:`lowbit.omniquant.LWC` with a ``(weight, spec)`` constructor.
* ``"paretoq"`` :class:`ParetoQ2bit` (ParetoQ's stretched elastic quantization, METHODS.md 4.3): the
  2-bit grid ``{-1.5, -0.5, 0.5, 1.5} s`` with a learnable ``s`` per group (initialised as ParetoQ's
  ``alpha = max|w|``, i.e. ``s = max|w| / 2``: nothing is clipped at init; LSQ gradient with ``Q_P = 1.5``
  and the group's own ``N``, not the tensor's numel as ParetoQ's code has it). lowbit's symmetric INT2
  grid ``{-2, -1, 0, 1} s`` cannot hold it and no table format has these levels, so it is stored as
  **asymmetric INT2 with the fractional zero-point 1.5** (``QuantSpec(IntFormat(2), gran,
  zero_point="float")``, CLI ``int2 ... --zero-point float``): ``w_hat = s (q - 1.5)``, ``q`` in 0..3,
  bit-exact through export. The price: the constant 1.5 is stored per group in fp16, 16 bits per group
  more than a symmetric grid would need (+0.25 bit/weight at g64, +0.125 at g128). (ParetoQ's 3-4 bit
  quantizer, ``clamp(round(w/s), -2^(b-1), 2^(b-1) - 1)``, is lowbit's symmetric grid: use ``"lsq"``.)

Unsupported combinations (e.g. LSQ with e8m0 scales, GGUF blocks, BCQ, stochastic rounding) raise a
one-line ``ValueError``. All quantizers work per tensor, per channel and per group (ragged last groups
included) on any device; their parameters are fp32 on the weight's device.

Model-level helpers: :func:`attach_learnable` gives every live ``QuantLinear`` a quantizer
(``module.learner``; the live forward then uses it), :func:`learnable_parameters` splits the
parameters for an optimizer, :func:`freeze_learnable` freezes each module on its learner's exact grid
and removes the learner.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .formats import BCQ, IntFormat
from .granularity import PerChannel, PerGroup, PerTensor, to_groups, ungroup
from .omniquant import LWC as _OmniLWC
from .qmodules import QuantLinear, quant_modules
from .quantizer import (QParams, QuantizedWeight, QuantSpec, _round_fp16, _round_scale_fp16, compute_qparams,
                        fake_quantize, quantize)

KINDS = ("ste", "lsq", "lsq+", "lwc", "paretoq")
LSQ_INITS = ("minmax", "lsq")


def _ste(value: Tensor, x: Tensor) -> Tensor:
    """Exactly ``value`` forward; the gradient of ``x`` backward."""
    return value + (x - x.detach())


class LearnableQuantizer(nn.Module):
    """Interface of the quantizers: ``forward(w)``, ``qparams(w)``, ``quantized_weight(w)``; ``spec``."""

    spec: QuantSpec

    def qparams(self, w: Tensor) -> QParams:
        raise NotImplementedError

    @torch.no_grad()
    def quantized_weight(self, w: Tensor) -> QuantizedWeight:
        """Codes of ``w`` on the learned grid, ready for ``QuantLinear.freeze``."""
        w = w.detach().float()
        qp = self.qparams(w)
        return QuantizedWeight(quantize(w, qp, self.spec), qp, self.spec)


def _check_nearest(spec: QuantSpec, what: str) -> None:
    if spec.rounding != "nearest":
        raise ValueError(f"{what} rounds to nearest (the frozen weight must equal the trained one); "
                         "drop stochastic rounding")


class MinMaxSTE(LearnableQuantizer):
    """LLM-QAT's quantizer: min-max qparams of the current weight at every call, straight-through."""

    def __init__(self, weight: Tensor, spec: QuantSpec):
        super().__init__()
        _check_nearest(spec, "ste")
        compute_qparams(weight.detach(), spec)  # the spec fits the weight (one-line errors otherwise)
        self.spec = spec

    def forward(self, w: Tensor) -> Tensor:
        return fake_quantize(w, self.spec)

    @torch.no_grad()
    def qparams(self, w: Tensor) -> QParams:
        return compute_qparams(w.detach().float(), self.spec)


class LSQ(LearnableQuantizer):
    """Learned step size (see the module docstring); ``init`` is ``"minmax"`` or ``"lsq"``."""

    learn_zero = False

    def __init__(self, weight: Tensor, spec: QuantSpec, init: str = "minmax"):
        super().__init__()
        name = type(self).__name__
        self._check(spec, name)
        if init not in LSQ_INITS:
            raise ValueError(f"unknown {name} init {init!r}; choose one of {LSQ_INITS}")
        self.spec = spec
        w = weight.detach().float()
        xg, lay = to_groups(w, spec.granularity)
        mask = lay.mask(w.device).float()
        n = mask.sum(-1, keepdim=True) * (xg.shape[0] if lay.shared_rows else 1)  # real weights per group
        if spec.is_uniform:
            self.qmax = spec.fmt.qmax
            self.register_buffer("levels", None)
        else:
            self.register_buffer("levels", spec.levels().to(w.device))
        q_pos = self._q_pos()
        scale, zero = self._init_params(w, xg, lay, mask, q_pos, init)
        self.scale = nn.Parameter(scale)
        if self.learn_zero:
            # LSQ+'s offset lives in weight units (beta = s0 z, s0 the initial scale): an optimizer step of lr moves
            # the zero-point by lr / s0 levels, as a step moves the scale by lr; learned in integer units it
            # would move lr levels a step and (rounded) never change at QAT learning rates
            self.register_buffer("zero_unit", scale.detach().abs().clamp_min(1e-8).clone())
            self.offset = nn.Parameter(zero * self.zero_unit)
        else:
            self.register_buffer("zero", zero)
        self.register_buffer("grad_scale", 1.0 / torch.sqrt(n * q_pos).expand_as(scale).clone())

    def _check(self, spec: QuantSpec, name: str) -> None:
        _check_nearest(spec, name)
        if isinstance(spec.fmt, BCQ):
            raise ValueError(f"{name} learns one scale per group; BCQ has its own fitted levels (use 'ste')")
        if not isinstance(spec.granularity, (PerTensor, PerChannel, PerGroup)):
            raise ValueError(f"{name} supports per-tensor, per-channel and per-group scales, not {spec.describe()}")
        if spec.scale != "fp16":
            raise ValueError(f"{name} learns fp16 scales; drop --scale {spec.scale}")

    def _q_pos(self) -> float:
        """LSQ's ``Q_P``: the number of positive levels."""
        if self.levels is not None:
            return float((self.levels > 0).sum())
        return float(2 ** (self.spec.fmt.bits - 1) - 1) if self.spec.symmetric else float(self.qmax)

    def _init_params(self, w: Tensor, xg: Tensor, lay, mask: Tensor, q_pos: float,
                     init: str) -> tuple[Tensor, Tensor | None]:
        spec = self.spec
        qp = compute_qparams(w, spec)
        if init == "minmax":
            return qp.scale.clone(), None if qp.zero is None else qp.zero.clone()
        dims = (0, 2) if lay.shared_rows else (2,)
        cnt = mask.expand_as(xg).sum(dims, keepdim=True)
        mean_abs = (xg.abs() * mask).sum(dims, keepdim=True) / cnt
        scale = 2 * mean_abs / math.sqrt(q_pos)
        scale = _round_scale_fp16(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = qp.zero
        if spec.is_uniform and not spec.symmetric:  # the zero-point that puts the group's min on the grid
            z = (-xg.amin(dims, keepdim=True).clamp(max=0) / scale).clamp(0, self.qmax)
            zero = _round_fp16(z) if spec.zero_point == "float" else torch.round(z)
        return scale, None if zero is None else zero.clone()

    def _grid(self) -> tuple[Tensor, Tensor | None]:
        """Scale and zero-point as stored (forward values), with the scaled LSQ gradients."""
        g = self.grad_scale
        s = _ste(_round_scale_fp16(self.scale.detach()), self.scale * g)
        z = self.zero
        if self.learn_zero:
            zc = z.detach().clamp(0, self.qmax)
            zq = _round_fp16(zc) if self.spec.zero_point == "float" else torch.round(zc)
            z = _ste(zq, z * g)
        return s, z

    def forward(self, w: Tensor) -> Tensor:
        xg, lay = to_groups(w.float(), self.spec.granularity)
        s, z = self._grid()
        if self.levels is None:  # lowbit's integer grid: the same operations as quantize + dequantize
            v = xg / s + z
            q = torch.clamp(_ste(torch.round(v.detach()), v), 0, self.qmax)
            y = s * (q - z)
        else:  # table format: nearest level, values past the ends saturate (no gradient to w there)
            L = self.levels
            v = (xg / s).clamp(L[0], L[-1])
            idx = torch.bucketize(v.detach(), (L[1:] + L[:-1]) / 2)
            y = s * _ste(L[idx], v)
        return ungroup(y, lay).to(w.dtype)

    @torch.no_grad()
    def qparams(self, w: Tensor | None = None) -> QParams:
        """The learned grid (it does not depend on ``w``) as lowbit qparams."""
        s, z = self._grid()
        return QParams(s.detach().clone(), None if z is None else z.detach().clone())


class LSQPlus(LSQ):
    """LSQ with a learned (integer, or fp16 with ``zero_point="float"``) zero-point: asymmetric INT only."""

    learn_zero = True

    @property
    def zero(self) -> Tensor:
        """The learned zero-point in integer units, before rounding (the parameter is ``offset = s0 z``)."""
        return self.offset / self.zero_unit

    def _check(self, spec: QuantSpec, name: str) -> None:
        super()._check(spec, name)
        if not (spec.is_uniform and not spec.symmetric):
            raise ValueError(f"{name} learns a zero-point: it needs an asymmetric integer spec, not {spec.describe()}")


class ParetoQ2bit(LSQ):
    """ParetoQ's stretched elastic 2-bit grid ``{-1.5, -0.5, 0.5, 1.5} s`` (see the module docstring)."""

    def __init__(self, weight: Tensor, spec: QuantSpec):
        super().__init__(weight, spec)

    def _check(self, spec: QuantSpec, name: str) -> None:
        super()._check(spec, name)
        if spec.fmt != IntFormat(2) or spec.symmetric or spec.zero_point != "float" or spec.clip_search:
            raise ValueError(f"{name} stores its grid as asymmetric int2 with the fp16 zero-point 1.5: use "
                             f"QuantSpec(IntFormat(2), granularity, zero_point='float') (CLI: int2 --zero-point "
                             f"float), not {spec.describe()}")

    def _q_pos(self) -> float:
        return 1.5  # the top level, in units of s

    def _init_params(self, w, xg, lay, mask, q_pos, init):
        dims = (0, 2) if lay.shared_rows else (2,)
        amax = xg.abs().amax(dims, keepdim=True)
        scale = _round_scale_fp16(torch.where(amax > 0, amax / 2, torch.ones_like(amax)))
        return scale, torch.full_like(scale, 1.5)


class LWC(_OmniLWC, LearnableQuantizer):
    """OmniQuant's learnable weight clipping (:class:`lowbit.omniquant.LWC`) for one weight."""

    def __init__(self, weight: Tensor, spec: QuantSpec, init: float = 4.0):
        super().__init__(weight.shape, spec, init=init, device=weight.device)

    def forward(self, w: Tensor) -> Tensor:
        return super().forward(w).to(w.dtype)


def make_quantizer(kind: str, weight: Tensor, spec: QuantSpec, **kwargs) -> LearnableQuantizer:
    """A learnable quantizer of ``kind`` (one of :data:`KINDS`) for ``weight`` under ``spec``."""
    classes = {"ste": MinMaxSTE, "lsq": LSQ, "lsq+": LSQPlus, "lwc": LWC, "paretoq": ParetoQ2bit}
    if kind not in classes:
        raise ValueError(f"unknown learnable quantizer {kind!r}; choose one of {KINDS}")
    return classes[kind](weight, spec, **kwargs)


# ------------------------------------------------------------------------------------ model level
def _live(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.w_spec is not None and not m.frozen}


def attach_learnable(model: nn.Module, kind: str, **kwargs) -> list[LearnableQuantizer]:
    """Give every live (non-frozen) ``QuantLinear`` with a weight spec a learnable quantizer of ``kind``,
    stored as its submodule ``learner`` (replacing one already there) and used by its live forward.
    Returns the quantizers, in module order. A weight tied to another quantized module is refused."""
    live = _live(model)
    owners: dict[int, int] = {}
    for m in quant_modules(model).values():
        owners[id(m.weight)] = owners.get(id(m.weight), 0) + 1
    learners = []
    for name, m in live.items():
        if owners[id(m.weight)] > 1:
            raise ValueError(f"{name}: its weight is tied to another quantized module; learnable quantizers "
                             "need a weight of its own")
        try:
            m.learner = make_quantizer(kind, m.weight.detach(), m.w_spec, **kwargs)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        learners.append(m.learner)
    return learners


def learnable_parameters(model: nn.Module, all_weights: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, quantizer_params)`` for an optimizer's two parameter groups.

    ``weights``: the float weights of the modules that have a learner (with ``all_weights``: every other
    trainable parameter of ``model`` too: norms, biases, embeddings, float layers); ``quantizer_params``:
    the learners' parameters (scales, zero-points, clipping logits). Each Parameter appears once."""
    qparams = []
    seen: set[int] = set()
    for m in model.modules():
        learner = getattr(m, "learner", None) if isinstance(m, QuantLinear) else None
        if learner is not None:
            for p in learner.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    qparams.append(p)
    weights = []
    if all_weights:
        candidates = [p for p in model.parameters() if p.requires_grad]
    else:
        candidates = [m.weight for m in model.modules()
                      if isinstance(m, QuantLinear) and getattr(m, "learner", None) is not None]
    for p in candidates:
        if id(p) not in seen:
            seen.add(id(p))
            weights.append(p)
    return weights, qparams


@torch.no_grad()
def freeze_learnable(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Freeze every ``QuantLinear`` that has a learner on the learner's exact grid and remove the learner.

    The frozen module computes bit for bit what the live one computed just before. Returns the stored
    :class:`~lowbit.quantizer.QuantizedWeight` by module name."""
    out = {}
    for name, m in list(model.named_modules()):  # a list: learners are removed on the way
        learner = getattr(m, "learner", None) if isinstance(m, QuantLinear) else None
        if learner is None:
            continue
        if m.w_spec != learner.spec:
            raise ValueError(f"{name}: the learner's spec {learner.spec.describe()} is not the module's "
                             f"{m.w_spec.describe()}")
        qw = learner.quantized_weight(m.weight)
        del m.learner
        m.freeze(qw)
        out[name] = qw
    return out


__all__ = ["KINDS", "LearnableQuantizer", "MinMaxSTE", "LSQ", "LSQPlus", "LWC", "ParetoQ2bit", "make_quantizer",
           "attach_learnable", "learnable_parameters", "freeze_learnable"]
