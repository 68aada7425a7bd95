"""Per-channel scale folding: the equivalence transform that AWQ and SmoothQuant share.

Linears that read one input ``X`` (q, k and v after the attention norm, say) compute ``X W^T``, and
for any positive ``s`` with one entry per input channel

    X W^T = (X diag(s)^-1) (W diag(s))^T

so the Linears' columns are multiplied by ``s`` and ``s`` is divided out of the op producing ``X``:

* a norm: RMSNorm ``n(x) * w`` -> ``w / s``; LayerNorm ``n(x) * w + b`` -> ``w / s`` and ``b / s``;
  Gemma's RMSNorm ``n(x) * (1 + w)`` -> ``w' = (1 + w) / s - 1`` (``ArchSpec.norm_offset``);
* a previous Linear, whose output rows (and bias) are divided by ``s``: up_proj for down_proj (the
  gate multiplies elementwise), v_proj for o_proj (attention mixes tokens, not channels; only when
  v_proj's output width is o_proj's input width, i.e. without GQA), OPT's fc1 for fc2 through ReLU
  (``relu(x / s) = relu(x) / s`` for ``s > 0``).

The float model is unchanged; what changes is how hard each tensor is to quantize. Which groups a
block has is data (``ArchSpec.scale_groups``); :func:`scale_groups` resolves them in a block and
drops those that cannot be folded exactly (GQA's v -> o, post-norm OPT, a non-ReLU activation,
frozen weights). :func:`input_stats` collects the per-input-channel mean and max of ``|x|`` over
calibration tokens with forward hooks, and :func:`float_mode` runs QuantLinears unquantized while
a transform measures the float model.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import ScaleGroup, arch_of
from .qmodules import QuantLinear


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Sequence[nn.Linear], s: Tensor, norm_offset: float = 0.0) -> None:
    """Multiply input channel ``j`` of every Linear in ``linears`` by ``s[j]`` and divide it out of ``prev``
    (a norm with a 1-D weight, or a Linear whose output rows are scaled), in place.

    ``norm_offset``: the norm multiplies by ``(norm_offset + weight)`` (1 for Gemma). Works on any device
    and dtype (computed in float32); QuantLinears share the float ``weight`` Parameter, so it applies to them.
    """
    n = s.numel()
    for lin in linears:
        if lin.in_features != n:
            raise ValueError(f"{n} scales for a Linear with {lin.in_features} inputs")
        w = lin.weight
        w.copy_(w.float() * s.to(w.device, torch.float32)[None, :])
    if isinstance(prev, nn.Linear):
        if prev.out_features != n:
            raise ValueError(f"{n} scales for a previous Linear with {prev.out_features} outputs (GQA v -> o?)")
        tensors = [(prev.weight, 0.0)] + ([(prev.bias, 0.0)] if prev.bias is not None else [])
    else:
        weight = getattr(prev, "weight", None)
        if weight is None or weight.dim() != 1 or weight.numel() != n:
            raise ValueError(f"cannot fold {n} scales into {type(prev).__name__}: needs a 1-D weight of that size")
        tensors = [(weight, norm_offset)]
        if getattr(prev, "bias", None) is not None:
            tensors.append((prev.bias, 0.0))
    for t, offset in tensors:
        sv = s.to(t.device, torch.float32).view(-1, *([1] * (t.dim() - 1)))
        t.copy_((t.float() + offset) / sv - offset)


@dataclass
class Group:
    """A :class:`~lowbit.models.ScaleGroup` resolved in one block."""

    spec: ScaleGroup
    prev: nn.Module
    linears: dict[str, nn.Linear]  # name (relative to the block) -> module
    inspect: nn.Module


def _frozen(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear) and m.frozen


def scale_groups(model: nn.Module, block: nn.Module) -> list[Group]:
    """The scale groups of ``block`` that can be folded exactly (see the module docstring)."""
    cfg = getattr(model, "config", None)
    out = []
    for g in arch_of(model).scale_groups:
        try:
            prev, inspect = block.get_submodule(g.prev), block.get_submodule(g.inspect)
            lins = {n: block.get_submodule(n) for n in g.linears}
        except AttributeError:
            continue
        if not all(isinstance(m, nn.Linear) for m in lins.values()) or any(map(_frozen, [prev, *lins.values()])):
            continue
        width = {m.in_features for m in lins.values()}
        if len(width) != 1:
            continue
        if isinstance(prev, nn.Linear):
            if prev.out_features not in width:  # v -> o under GQA
                continue
        elif getattr(prev, "weight", None) is None or not getattr(cfg, "do_layer_norm_before", True):
            continue  # a norm without weight, or OPT-350m's norms after attention / FFN
        if g.act is not None and getattr(cfg, g.act, None) != "relu":
            continue
        out.append(Group(g, prev, lins, inspect))
    return out


class ChannelStats:
    """Per-input-channel mean and max of ``|x|`` over all the tokens seen."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.max: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).float().abs()
        s, m = a.sum(0), a.amax(0)
        self.sum = s if self.sum is None else self.sum + s
        self.max = m if self.max is None else torch.maximum(self.max, m)
        self.n += a.shape[0]

    @property
    def mean_abs(self) -> Tensor:
        return self.sum / max(self.n, 1)

    @property
    def max_abs(self) -> Tensor:
        return self.max


@contextmanager
def input_stats(root: nn.Module, names: Sequence[str]) -> Iterator[dict[str, ChannelStats]]:
    """Within the ``with``, every forward of ``root.get_submodule(name)`` adds its input to ``stats[name]``."""
    stats = {n: ChannelStats() for n in names}

    def hook(name):
        def f(mod, args, kwargs):
            stats[name].update(args[0] if args else next(iter(kwargs.values())))
        return f

    handles = [root.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in stats]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def float_mode(module: nn.Module) -> Iterator[dict[QuantLinear, tuple]]:
    """Run the QuantLinears inside ``module`` without weight, activation or output (KV-cache) quantization;
    yields their ``(w_spec, a_spec, out_spec)``, restored on exit."""
    specs = {m: (m.w_spec, m.a_spec, m.out_spec) for m in module.modules() if isinstance(m, QuantLinear)}
    for m in specs:
        m.w_spec = m.a_spec = m.out_spec = None
    try:
        yield specs
    finally:
        for m, (w, a, o) in specs.items():
            m.w_spec, m.a_spec, m.out_spec = w, a, o


@contextmanager
def quant_mode(specs: dict[QuantLinear, tuple], module: nn.Module) -> Iterator[None]:
    """Inside :func:`float_mode`: quantize ``module``'s QuantLinears again (live, as RTN would) for a while."""
    mods = [m for m in module.modules() if m in specs]
    for m in mods:
        m.w_spec, m.a_spec, m.out_spec = specs[m]
    try:
        yield
    finally:
        for m in mods:
            m.w_spec = m.a_spec = m.out_spec = None


def rel_error(out: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """``sum ||out - ref||^2 / sum ||ref||^2`` over batches."""
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / max(den, 1e-30)


__all__ = ["fold_scales", "Group", "scale_groups", "ChannelStats", "input_stats", "float_mode", "quant_mode",
           "rel_error"]
