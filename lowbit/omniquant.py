"""OmniQuant (Shao et al. 2023, arXiv 2308.13137): block-wise learned clipping and equivalent transforms.

Each decoder block in turn is given a few learnable quantization parameters; the float weights stay
fixed. The parameters are fitted by gradient descent so that the quantized block reproduces the float
block's output, then folded into the weights, and the block is rounded and frozen (METHODS.md 7.2).

**Learnable Weight Clipping (LWC).** One pair ``gamma, beta`` per quantization group (per row with
``channel``, per row and run of ``g`` columns with ``g<size>``, a short last group included), both
initialised to 4.0 (``sigmoid(4) = 0.982``). With ``max``/``min`` the group's extremes::

    asymmetric:  hi = max(sigmoid(gamma) * max, 0),  lo = min(sigmoid(beta) * min, 0)
                 s  = fp16(max((hi - lo) / (2^b - 1), else 1)),   z = clamp(round(-lo / s), 0, 2^b - 1)
    symmetric:   s  = fp16(sigmoid(gamma) * max(|max|, |min|) / (2^(b-1) - 1)),   z = 2^(b-1)
    W_hat        = s * (clamp(round(W / s + z), 0, 2^b - 1) - z)

which is lowbit's own integer grid (:mod:`lowbit.quantizer`) with a shrunk range; ``round`` and the
fp16 rounding of ``s`` use the straight-through estimator (``x + (round(x) - x).detach()``) so that
the gradient reaches ``gamma``/``beta`` through ``s`` and ``z``. At the end the learned ``s, z`` become
the stored :class:`~lowbit.quantizer.QParams` (fp16-exact scales, integer zero-points): the frozen
weight is exactly ``dequantize(quantize(W, qp))`` and equals the fake-quantized weight seen in training.
Integer formats, asymmetric or symmetric (2 bits and more), per tensor/channel/group, fp16 scales.

**Learnable Equivalent Transformation (LET).** One positive per-channel scale ``s`` per smoothing group:
``input_layernorm -> q, k, v`` and ``post_attention_layernorm -> gate, up`` (Gemma: the pre-FFN norm;
OPT: the pre-LN layer norms -> q, k, v and -> fc1), and ``v -> o`` when ``v_proj``'s outputs are
``o_proj``'s inputs one to one (no grouped-query attention; SmolLM2 and stories260K use GQA, so it is
skipped there)::

    Y = (X / s) (W * s)^T          norm output divided by s (norm weight and bias / s), columns of W * s
    v -> o:  rows of W_v (and b_v) / s, columns of W_o * s

Initialised with SmoothQuant, ``s_j = max|X_j|^a / max_i |W_ij|^(1-a)`` (``a = 0.5``; ``X`` the float
model's activations on the calibration set, ``W`` all consumers stacked), both clamped to 1e-5. Channel
shifts are disabled, as in the reference code for LLaMA. During training ``s`` is applied on the fly;
afterwards it is folded into the norm and the Linear weights (the float model with folded LET computes
the same function) and the folded weights are quantized. As in OmniQuant, LET is on by default only
for weight-activation quantization; weight-only runs use LWC alone.

**Training**, block by block with :func:`lowbit.blockwise.for_each_block` (the quantized prefix feeds
block ``i``): targets are the *float* block's outputs on the *float-chain* inputs (the float model's
own hidden states, ``fp_inps`` of the reference code), not on the quantized-prefix inputs, so each
block is pulled back towards the float model's trajectory and prefix errors are corrected rather than
copied. ``loss = MSE(block_q(x_q), block_fp(x_fp))``; AdamW (weight decay 0), lr 1e-2 for LWC and
5e-3 for LET, batches of ``omni_batch`` samples in calibration order, ``omni_epochs`` epochs, all in
fp32 (the block is cast to fp32 while it trains and back afterwards). Inputs of each Linear are
fake-quantized by its activation spec (e.g. per-token int8) with the values of ``QuantLinear``; as in
OmniQuant's dynamic quantizer the gradient also flows through each token's range (straight-through
rounding, :func:`dynamic_fake_quant`). That keeps the trained function invariant to a common factor of
the LET scales in the gradient too; with the range held constant the LET scales drift towards zero at
4-bit activations and the folded block is ruined (per-token ranges taken by the few clamped channels). Only
the current block trains; the hidden states of all calibration samples are kept (quantized chain and
float chain). A NaN or inf loss stops with a one-line error naming the block.

Settings (``cfg.extra``, ``--opt KEY=VALUE``):

* ``omni_epochs`` (20): epochs over the calibration samples per block (0: initial LWC/LET only);
* ``omni_lwc_lr`` (1e-2), ``omni_let_lr`` (5e-3): AdamW learning rates;
* ``omni_let`` (true with an activation spec, else false): learn the equivalent transformation;
* ``omni_batch`` (1): samples per optimisation step;
* ``omni_samples`` (all): use only the first n calibration samples;
* ``omni_alpha`` (0.5): SmoothQuant migration strength of the LET initialisation.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .formats import IntFormat, max_value
from .granularity import PerChannel, PerGroup, PerTensor, reduce_dims, to_groups, ungroup
from .models import arch_of, blocks as blocks_of
from .qmodules import QuantLinear
from .quantize import register
from .quantizer import (FP16_TINY, QParams, QuantizedWeight, QuantSpec, _dq_grouped, _q_grouped, compute_qparams,
                        dequantize, quantize)

log = logging.getLogger(__name__)

DEFAULTS = {"omni_epochs": 20, "omni_lwc_lr": 1e-2, "omni_let_lr": 5e-3, "omni_let": None, "omni_batch": 1,
            "omni_samples": None, "omni_alpha": 0.5}
LET_MIN = 1e-5  # smallest LET scale (and SmoothQuant's clamp of the statistics)


# ------------------------------------------------------------------------------------------- LWC
def check_lwc_spec(spec: QuantSpec) -> None:
    """One-line ValueError unless LWC supports ``spec`` (integer grid, fp16 scales, tensor/channel/group)."""
    what = spec.describe()
    if not isinstance(spec.fmt, IntFormat) or not spec.is_uniform:
        raise ValueError(f"omniquant (LWC) supports integer formats of 2+ bits (asym, or sym), not {what}")
    if not isinstance(spec.granularity, (PerTensor, PerChannel, PerGroup)):
        raise ValueError(f"omniquant (LWC) supports per-tensor, per-channel and per-group scales, not {what}")
    if spec.scale != "fp16":
        raise ValueError(f"omniquant (LWC) learns fp16 scales; drop --scale {spec.scale}")
    if spec.rounding != "nearest":
        raise ValueError("omniquant rounds to nearest; drop stochastic rounding")
    if spec.clip_search:
        raise ValueError("omniquant learns its own clipping (LWC); drop the MSE clip search")


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _fp16_ste(s: Tensor) -> Tensor:
    """``s`` rounded to the stored fp16 value (as lowbit stores scales), straight-through."""
    return s + (s.detach().clamp(FP16_TINY, 65504.0).half().float() - s).detach()


class LWC(nn.Module):
    """Learnable weight clipping for one weight of ``shape`` under ``spec`` (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, spec: QuantSpec, init: float = 4.0,
                 device: torch.device | str | None = None):
        super().__init__()
        check_lwc_spec(spec)
        self.spec = spec
        xg, lay = to_groups(torch.zeros(shape, device="meta"), spec.granularity)
        pshape = (1 if lay.shared_rows else xg.shape[0], xg.shape[1], 1)
        self.gamma = nn.Parameter(torch.full(pshape, float(init), device=device))
        self.beta = None if spec.symmetric else nn.Parameter(torch.full(pshape, float(init), device=device))

    def _params(self, xg: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Scale and zero-point (grouped layout), differentiable in ``gamma``, ``beta`` and ``xg``."""
        spec, fmt = self.spec, self.spec.fmt
        xmax, xmin = xg.amax(dims, keepdim=True), xg.amin(dims, keepdim=True)
        if spec.symmetric:
            amax = torch.maximum(xmax.abs(), xmin.abs()) * torch.sigmoid(self.gamma)
            base = amax / max_value(fmt, True)
            scale = _fp16_ste(torch.where(base > 0, base, torch.ones_like(base)))
            return scale, torch.full_like(scale, float(2 ** (fmt.bits - 1)))
        hi = (torch.sigmoid(self.gamma) * xmax).clamp(min=0)
        lo = (torch.sigmoid(self.beta) * xmin).clamp(max=0)
        scale = (hi - lo) / fmt.qmax
        scale = _fp16_ste(torch.where(scale > 0, scale, torch.ones_like(scale)))
        zero = _round_ste(-lo / scale).clamp(0, fmt.qmax)
        return scale, zero

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized ``w`` (fp32), with gradients to ``gamma``/``beta`` (and to ``w``, straight-through)."""
        xg, lay = to_groups(w.float(), self.spec.granularity)
        scale, zero = self._params(xg, reduce_dims(lay))
        q = torch.clamp(_round_ste(xg / scale + zero), 0, self.spec.fmt.qmax)
        return ungroup(scale * (q - zero), lay)

    @torch.no_grad()
    def qparams(self, w: Tensor) -> QParams:
        """The learned clipping as lowbit qparams of ``w`` (fp16-exact scales, integer zero-points)."""
        xg, lay = to_groups(w.detach().float(), self.spec.granularity)
        scale, zero = self._params(xg, reduce_dims(lay))
        return QParams(scale.detach().clone(), zero.detach().clone())

    @torch.no_grad()
    def quantized_weight(self, w: Tensor) -> QuantizedWeight:
        qp = self.qparams(w)
        return QuantizedWeight(quantize(w.detach().float(), qp, self.spec), qp, self.spec)


# ------------------------------------------------------------------------------------------- LET
@dataclass
class SmoothGroup:
    """One LET scale: the producer's output is divided by ``s`` and the consumers' columns multiplied.

    ``producer`` is a norm (``kind="norm"``) or a Linear whose output rows are divided (``kind="linear"``,
    the ``v -> o`` pair); paths are relative to the block."""

    kind: str
    producer: str
    consumers: tuple[str, ...]
    scale: Tensor | None = None


def _first(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


def let_groups(block: nn.Module, model: nn.Module) -> list[SmoothGroup]:
    """The smoothing groups of one decoder block of ``model`` (scales not set)."""
    arch = arch_of(model)
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError("omniquant LET needs pre-norm blocks (this OPT model normalises after attention); "
                         "use --opt omni_let=false")
    attn_norm = _first(block, ("input_layernorm", "self_attn_layer_norm"))
    mlp_norm = _first(block, ("pre_feedforward_layernorm", "post_attention_layernorm", "final_layer_norm"))
    if attn_norm is None or mlp_norm is None:
        raise ValueError(f"omniquant LET does not know the norms of {type(block).__name__}; use --opt omni_let=false")
    groups = [SmoothGroup("norm", attn_norm, tuple(arch.sequential[0])),
              SmoothGroup("norm", mlp_norm, tuple(arch.sequential[2]))]
    v, o = block.get_submodule(arch.attn[2]), block.get_submodule(arch.attn[3])
    if v.out_features == o.in_features:  # no GQA: v's output channels are o's input channels
        groups.append(SmoothGroup("linear", arch.attn[2], (arch.attn[3],)))
    return groups


def _let_value(scale: Tensor) -> Tensor:
    """The LET scale as applied: at least ``LET_MIN``. The clamp passes the gradient straight through: with a
    plain clamp a scale that an AdamW step takes below ``LET_MIN`` gets no gradient again and stays there for
    good (its channel's input multiplied by ``1 / LET_MIN``), which a long run does to small scales."""
    return scale + (scale.clamp(min=LET_MIN) - scale).detach()


def smoothquant_scale(act_max: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """SmoothQuant's ``max|X_j|^alpha / max|W_:,j|^(1-alpha)`` over the stacked ``weights`` (out, in)."""
    wmax = torch.cat([w.detach().abs().float() for w in weights]).amax(0).clamp(min=LET_MIN)
    return (act_max.float().clamp(min=LET_MIN).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=LET_MIN)


@torch.no_grad()
def _fold_norm(norm: nn.Module, s: Tensor) -> None:
    """Divide the norm's output by ``s`` permanently (weight and bias; Gemma norms scale by 1 + w)."""
    w = norm.weight
    if type(norm).__name__.startswith("Gemma"):
        w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
    else:
        w.copy_((w.float() / s).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))


def _effective(lin: nn.Linear, s_in: Tensor | None, s_out: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of ``lin`` with the LET scales applied (the same ops training and folding use)."""
    w, b = lin.weight.float(), None if lin.bias is None else lin.bias.float()
    if s_in is not None:
        w = w * s_in
    if s_out is not None:
        w = w / s_out[:, None]
        b = None if b is None else b / s_out
    return w, b


@torch.no_grad()
def fold_let(block: nn.Module, groups: list[SmoothGroup]) -> None:
    """Fold the groups' scales into the norms and Linear weights of ``block`` (the function is unchanged)."""
    s_in, s_out = _scales_by_linear(groups)
    for name in set(s_in) | set(s_out):
        lin = block.get_submodule(name)
        w, b = _effective(lin, s_in.get(name), s_out.get(name))
        lin.weight.copy_(w.to(lin.weight.dtype))
        if b is not None:
            lin.bias.copy_(b.to(lin.bias.dtype))
    for g in groups:
        if g.kind == "norm":
            _fold_norm(block.get_submodule(g.producer), _let_value(g.scale))


def _scales_by_linear(groups: list[SmoothGroup]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    s_in: dict[str, Tensor] = {}
    s_out: dict[str, Tensor] = {}
    for g in groups:
        s = _let_value(g.scale)
        for c in g.consumers:
            s_in[c] = s
        if g.kind == "linear":
            s_out[g.producer] = s
    return s_in, s_out


# ------------------------------------------------------------------------------ training harness
class _State:
    """Shared switches of the wrappers: quantize (weights and activations), apply LET, record stats."""

    def __init__(self):
        self.quant = False
        self.let = False
        self.record = False
        self.s_in: dict[str, Tensor] = {}
        self.s_out: dict[str, Tensor] = {}


def dynamic_fake_quant(x: Tensor, spec: QuantSpec, a_clip: float = 1.0) -> Tensor:
    """QuantLinear's activation quantizer, with the range differentiable (OmniQuant's dynamic quantizer).

    Forward: exactly the values of :meth:`QuantLinear.forward` (min-max qparams of ``x`` per token or
    group, the scale times ``a_clip``). Backward: the straight-through mask for ``x`` *plus* the path
    through the group's range ``r`` (``max|x|``, or ``max(x, 0) - min(x, 0)`` when asymmetric), which
    the scale is proportional to::

        dy/dx = inside + (dr/dx) * (y - inside * x) / r

    so that ``y(c x) = c y(x)`` holds for the surrogate as it does for the quantizer. With the range
    treated as a constant (``fake_quantize``'s gradient), the gradient of LET's ``(X / s) (W s)^T`` along
    ``s`` itself is ``sum (Q(X / s) - X / s) Q(W s)^T dL/dY``, which correlates with the output error and
    is positive: every step shrinks all LET scales together, by up to the learning rate under AdamW,
    although the loss does not depend on their common factor. At 4-bit activations that drift drives
    scales to ``LET_MIN``, whose channels then dominate each token's range and zero the others.
    """
    qp = compute_qparams(x, spec)  # checks the input (NaN, shape) too
    if a_clip != 1.0:  # as QuantLinear.forward: scale * a_clip, same zero-point
        qp.scale = qp.scale * a_clip
    xg, lay = to_groups(x.float(), spec.granularity, qp.perm)
    xd = xg.detach()
    q, inside = _q_grouped(xd, qp, spec, None)
    y = _dq_grouped(q, qp, spec)
    if not x.requires_grad:
        return ungroup(y, lay).to(x.dtype)
    dims = reduce_dims(lay)
    hi, lo = xg.amax(dims, keepdim=True), xg.amin(dims, keepdim=True)
    if spec.is_uniform and not spec.symmetric:
        r = hi.clamp(min=0) - lo.clamp(max=0)
    else:
        r = torch.maximum(hi.abs(), lo.abs())
    rd = r.detach()
    m = inside.to(xg.dtype)
    slope = (y - m * xd) / torch.where(rd > 0, rd, torch.ones_like(rd))
    y = y + (xg - xd) * m + (r - rd) * slope  # the added terms are exactly zero forward
    return ungroup(y, lay).to(x.dtype)


class _OmniLinear(nn.Module):
    """Stands in for one Linear of the training block. ``float``: the plain float Linear (still through
    the QuantLinear's own forward, so input transforms it carries are kept); ``quant``: LET-scaled weight,
    LWC fake-quant and the module's activation quantizer (its values, with the gradient of
    :func:`dynamic_fake_quant`), all differentiable."""

    def __init__(self, name: str, lin: nn.Linear, state: _State):
        super().__init__()
        self.name, self.lin, self.state = name, lin, state
        self.lwc: LWC | None = None
        self.act_max: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        st, lin = self.state, self.lin
        if st.record:
            m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            self.act_max = m if self.act_max is None else torch.maximum(self.act_max, m)
        if st.let:
            w, b = _effective(lin, st.s_in.get(self.name), st.s_out.get(self.name))
        else:
            w, b = lin.weight, lin.bias
        if not isinstance(lin, QuantLinear):
            return F.linear(x.to(w.dtype), w, b)
        lwc = self.lwc if st.quant else None
        a_spec, a_clip, out_spec = lin.a_spec, lin.a_clip, lin.out_spec
        lin.quantized_weight = (lambda: lwc(w)) if lwc is not None else (lambda: w)
        lin.a_spec = None  # quantized below, in a pre-hook that runs after any input rotation of the module
        lin.out_spec = None  # the KV-cache quantizer: below, after LET's bias swap (none in the float targets)
        hook = None
        if st.quant and a_spec is not None:
            hook = lin.register_forward_pre_hook(
                lambda mod, args: (dynamic_fake_quant(args[0], a_spec, a_clip), *args[1:]))
        try:
            out = lin(x)
        finally:
            if hook is not None:
                hook.remove()
            del lin.quantized_weight
            lin.a_spec, lin.out_spec = a_spec, out_spec
        if st.let and b is not None and self.name in st.s_out:  # LET divided the bias (v -> o): swap it in
            out = out + (b - lin.bias)
        if st.quant and out_spec is not None:
            out = dynamic_fake_quant(out, out_spec)
        return out


def _wrap(block: nn.Module, names: list[str], state: _State) -> dict[str, _OmniLinear]:
    """Put a training wrapper in place of each named Linear of ``block`` (undo with :func:`_unwrap`)."""
    wrappers = {n: _OmniLinear(n, block.get_submodule(n), state) for n in names}
    for n, w in wrappers.items():
        _set(block, n, w)
    return wrappers


def _unwrap(block: nn.Module, wrappers: dict[str, _OmniLinear]) -> None:
    for n, w in wrappers.items():
        _set(block, n, w.lin)
        w.lwc = None


def _norm_hooks(block: nn.Module, groups: list[SmoothGroup], state: _State) -> list:
    """Forward hooks dividing the smoothing norms' outputs by the current LET scales (while ``state.let``)."""
    def hook(s: Tensor):
        return lambda mod, inp, out: out / _let_value(s) if state.let else out

    return [block.get_submodule(g.producer).register_forward_hook(hook(g.scale)) for g in groups if g.kind == "norm"]


def settings(cfg: QuantConfig) -> dict:
    """The omniquant settings of ``cfg.extra`` with defaults, checked (one-line ValueErrors)."""
    o = {k: cfg.extra.get(k, v) for k, v in DEFAULTS.items()}
    if o["omni_let"] is None:
        o["omni_let"] = cfg.act is not None
    if not isinstance(o["omni_epochs"], int) or o["omni_epochs"] < 0:
        raise ValueError(f"omni_epochs must be an integer >= 0, got {o['omni_epochs']!r}")
    for k in ("omni_lwc_lr", "omni_let_lr"):
        if not isinstance(o[k], (int, float)) or not 0 < o[k] < math.inf:
            raise ValueError(f"{k} must be a positive number, got {o[k]!r}")
    if not isinstance(o["omni_batch"], int) or o["omni_batch"] < 1:
        raise ValueError(f"omni_batch must be a positive integer, got {o['omni_batch']!r}")
    if o["omni_samples"] is not None and (not isinstance(o["omni_samples"], int) or o["omni_samples"] < 1):
        raise ValueError(f"omni_samples must be a positive integer, got {o['omni_samples']!r}")
    if not isinstance(o["omni_let"], bool):
        raise ValueError(f"omni_let must be true or false, got {o['omni_let']!r}")
    if not isinstance(o["omni_alpha"], (int, float)) or not 0 <= o["omni_alpha"] <= 1:
        raise ValueError(f"omni_alpha must lie in [0, 1], got {o['omni_alpha']!r}")
    return o


def _cast(v, dtype: torch.dtype):
    if isinstance(v, Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, tuple):
        return tuple(_cast(t, dtype) for t in v)
    return v


def _block_loss(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out, target)


def omniquant_block(block: nn.Module, model: nn.Module, xs: list[Tensor], fp_xs: list[Tensor], kwargs: dict,
                    opts: dict, index: int = 0) -> tuple[float, list[Tensor]]:
    """Learn LWC (and LET) for one block, fold, round and freeze its Linears.

    ``xs``: the block's inputs from the quantized prefix; ``fp_xs``: the float chain's inputs. Returns the
    mean loss of the last epoch (nan without training) and the float block's outputs (the next float inputs).
    """
    from .blockwise import run_block

    arch = arch_of(model)
    dtype = next(block.parameters()).dtype
    grad_flags = {n: p.requires_grad for n, p in block.named_parameters()}
    block.requires_grad_(False)
    if dtype != torch.float32:
        block.float()
    kw = {k: _cast(v, torch.float32) for k, v in kwargs.items()}
    state = _State()
    candidates = let_groups(block, model) if opts["omni_let"] else []
    names = [n for n in arch.linears if isinstance(_get(block, n), nn.Linear)]
    wrappers = _wrap(block, names, state)
    hooks = []
    try:
        # 1. float targets on the float chain, and activation statistics for the LET initialisation
        state.record = True
        with torch.no_grad():
            targets = [run_block(block, x.float(), kw) for x in fp_xs]
        state.record = False
        # 2. LET groups (consumers must be live QuantLinears or float Linears; no online input transform)
        groups: list[SmoothGroup] = []
        if candidates:
            for g in candidates:
                touched = g.consumers + ((g.producer,) if g.kind == "linear" else ())
                mods = [wrappers[c].lin for c in touched if c in wrappers]
                if len(mods) != len(touched) or any(
                        getattr(m, "frozen", False) or getattr(m, "in_rot", None) is not None for m in mods):
                    log.info("omniquant: LET group %s -> %s skipped", g.producer, g.consumers)
                    continue
                act = wrappers[g.consumers[0]].act_max
                g.scale = nn.Parameter(smoothquant_scale(act, [wrappers[c].lin.weight for c in g.consumers],
                                                         opts["omni_alpha"]))
                groups.append(g)
            hooks = _norm_hooks(block, groups, state)
        # 3. LWC for every live quantized weight
        for w in wrappers.values():
            if isinstance(w.lin, QuantLinear) and w.lin.w_spec is not None and not w.lin.frozen:
                w.lwc = LWC(w.lin.weight.shape, w.lin.w_spec, device=w.lin.weight.device)
        lwc_params = [p for w in wrappers.values() if w.lwc is not None for p in w.lwc.parameters()]
        let_params = [g.scale for g in groups]
        # 4. train
        state.quant, state.let = True, bool(groups)
        loss_val = float("nan")
        param_groups = ([{"params": lwc_params, "lr": float(opts["omni_lwc_lr"])}] if lwc_params else []) + \
                       ([{"params": let_params, "lr": float(opts["omni_let_lr"])}] if let_params else [])
        if param_groups and opts["omni_epochs"] > 0:
            opt = torch.optim.AdamW(param_groups, weight_decay=0.0)
            n, bs = len(xs), opts["omni_batch"]
            with torch.enable_grad():
                for epoch in range(opts["omni_epochs"]):
                    total = torch.zeros((), device=xs[0].device)
                    for j in range(0, n, bs):
                        state.s_in, state.s_out = _scales_by_linear(groups)
                        x = torch.cat(xs[j:j + bs]).float()
                        y = torch.cat(targets[j:j + bs])
                        try:
                            loss = _block_loss(run_block(block, x, kw), y)
                        except ValueError as e:  # the activation quantizer refuses NaN/inf inputs
                            if "NaN" not in str(e):
                                raise
                            loss = torch.tensor(float("nan"))
                        if not torch.isfinite(loss):
                            raise ValueError(
                                f"omniquant: block {index} loss became {loss.item()} in epoch {epoch + 1}; lower "
                                f"the learning rates (e.g. --opt omni_lwc_lr={opts['omni_lwc_lr'] / 10:g} "
                                f"--opt omni_let_lr={opts['omni_let_lr'] / 10:g})")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        total += loss.detach() * x.shape[0]
                    loss_val = (total / n).item()
        # 5. fold LET, round with the learned clipping, freeze
        state.quant = state.let = False
        with torch.no_grad():
            fold_let(_Unwrapped(block, wrappers), groups)
            for name, w in wrappers.items():
                if w.lwc is None:
                    continue
                lin = w.lin
                qw = w.lwc.quantized_weight(lin.weight)
                learned = w.lwc(lin.weight)
                lin.freeze(qw)
                _check_frozen(name, index, lin, qw, learned)
    finally:
        for h in hooks:
            h.remove()
        _unwrap(block, wrappers)
        for n, p in block.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        if dtype != torch.float32:
            block.to(dtype)
    return loss_val, [t.to(dtype) for t in targets]


def _check_frozen(name: str, index: int, lin: QuantLinear, qw: QuantizedWeight, learned: Tensor) -> None:
    """The frozen weight lies on its stored grid and is what training saw."""
    w = lin.weight.detach().float()
    if not torch.equal(quantize(w, qw.qparams, qw.spec), qw.codes):
        raise RuntimeError(f"omniquant: block {index} {name}: the frozen weight is not on its stored grid")
    exact = dequantize(qw.codes, qw.qparams, qw.spec)
    off = (learned != exact).float().mean().item()
    if off > 1e-3:
        raise RuntimeError(f"omniquant: block {index} {name}: {off:.2%} of the learned fake-quantized weights "
                           "differ from the stored grid")


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _set(block: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, mod)


class _Unwrapped:
    """``get_submodule`` of a block whose Linears are wrapped, returning the Linears themselves."""

    def __init__(self, block: nn.Module, wrappers: dict[str, _OmniLinear]):
        self.block, self.wrappers = block, wrappers

    def get_submodule(self, path: str) -> nn.Module:
        return self.wrappers[path].lin if path in self.wrappers else self.block.get_submodule(path)


# ---------------------------------------------------------------------------------------- method
@register("omniquant", needs_data=True)
def omniquant_method(model: nn.Module, cfg: QuantConfig, calib: Tensor | None = None, progress: bool = True) -> None:
    """OmniQuant over all decoder blocks (see the module docstring). A per-block summary (last-epoch loss,
    seconds) is left in ``model.omniquant_report``."""
    from .blockwise import capture_inputs, for_each_block

    opts = settings(cfg)
    blocks = blocks_of(model)
    if cfg.weight is None and not opts["omni_let"]:
        log.warning("omniquant: no weight spec and LET off: nothing to learn")
        return
    for blk in blocks:
        for m in blk.modules():
            if isinstance(m, QuantLinear) and m.w_spec is not None and not m.frozen:
                check_lwc_spec(m.w_spec)
    if opts["omni_let"]:
        let_groups(blocks[0], model)  # unsupported architectures fail before any work
    if opts["omni_samples"] is not None:
        calib = calib[: opts["omni_samples"]]
    hidden, kwargs = capture_inputs(model, list(calib.split(1)))
    fp_inps = list(hidden)
    report: list[dict] = []
    bar = tqdm(total=len(blocks), desc="omniquant", disable=not progress, unit="block")

    def quantize_block(i: int, block: nn.Module, xs: list[Tensor], kw: dict) -> None:
        t0 = time.time()
        fp_xs = [f.to(xs[0].device) for f in fp_inps]
        loss, fp_next = omniquant_block(block, model, xs, fp_xs, kw, opts, index=i)
        fp_inps[:] = fp_next
        report.append({"block": i, "loss": loss, "seconds": time.time() - t0})
        bar.set_postfix(loss=f"{loss:.3g}", s=f"{time.time() - t0:.1f}")
        bar.update(1)
        return {"loss": loss, "fp_next": list(fp_next)}  # the float stream goes on with a resumed run

    def restored(i: int, info: dict) -> None:
        report.append({"block": i, "loss": info["loss"], "seconds": info["seconds"], "restored": True})
        if "fp_next" in info:
            fp_inps[:] = info["fp_next"]
        bar.update(1)

    for_each_block(model, hidden, kwargs, quantize_block, on_restore=restored)
    bar.close()
    model.omniquant_report = report
    log.info("omniquant: %s", ", ".join(f"block {r['block']} loss {r['loss']:.3g} ({r['seconds']:.1f}s)"
                                         for r in report))
