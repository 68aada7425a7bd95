"""Granularity: which values share one scale (and zero-point).

Every granularity maps a tensor onto one *grouped view* ``(R, G, g)``: ``R`` rows, ``G`` groups per
row, ``g`` values per group. Quantization parameters have shape ``(R, G, 1)`` (or ``(1, G, 1)``
when the statistic is shared by all rows, as PEG's and per-tensor scales are). A row whose length
``n`` is not a multiple of ``g`` gets a short last group (stories260K's FFN width is 172,
SmolLM2's hidden size 576): it is padded with a copy of its own last value, which leaves the
group's min, max and absmax unchanged, and the padding is cut off again by :func:`ungroup`.

* ``PerTensor()``: one scale for the whole tensor.
* ``PerChannel()``: one per output channel (row) of a weight ``(out, in)``.
* ``PerGroup(size)``: one per run of ``size`` consecutive input columns of a row.
* ``GGUFBlock(super_block, sub_block, scale_bits)``: llama.cpp k-quant style two levels: one
  scale (and min) per sub-block, themselves quantized to ``scale_bits`` bits against one fp16
  scale per super-block.
* ``PerToken()``: activations ``(..., d)``: one scale per token (row of the last dimension).
* ``PEG(groups, permute)``: activations: the hidden dimension is split into ``groups`` groups of
  dimensions, each with one scale shared by all tokens (Bondarenko et al. 2021); ``permute`` first
  sorts dimensions by range so outlier dimensions share a group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PerTensor:
    pass


@dataclass(frozen=True)
class PerChannel:
    pass


@dataclass(frozen=True)
class PerGroup:
    size: int

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"group size must be a positive integer, got {self.size!r}")


@dataclass(frozen=True)
class GGUFBlock:
    super_block: int = 256
    sub_block: int = 32
    scale_bits: int = 6

    def __post_init__(self):
        if self.sub_block < 1 or self.super_block % self.sub_block:
            raise ValueError(f"GGUF super-block {self.super_block} must be a multiple of sub-block {self.sub_block}")
        if not 2 <= self.scale_bits <= 8:
            raise ValueError(f"GGUF sub-block scale bits must be 2..8, got {self.scale_bits}")

    @property
    def subs_per_super(self) -> int:
        return self.super_block // self.sub_block


@dataclass(frozen=True)
class PerToken:
    pass


@dataclass(frozen=True)
class PEG:
    groups: int = 6
    permute: bool = False

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError(f"PEG needs at least one group, got {self.groups}")


Granularity = PerTensor | PerChannel | PerGroup | GGUFBlock | PerToken | PEG
WEIGHT_GRANULARITIES = (PerTensor, PerChannel, PerGroup, GGUFBlock)
ACT_GRANULARITIES = (PerTensor, PerToken, PEG)


@dataclass
class GroupLayout:
    """How a tensor was reshaped into ``(R, G, g)`` and how to undo it."""

    shape: torch.Size  # original shape
    n: int  # real length of the grouped (last) dimension
    g: int  # group size after padding
    shared_rows: bool  # statistics reduce over rows too (per-tensor, PEG)
    perm: Tensor | None = None  # PEG: column permutation applied before grouping

    @property
    def pad(self) -> int:
        return (-self.n) % self.g

    def mask(self, device=None) -> Tensor:
        """``(1, G, g)`` boolean mask of the real (non-padded) positions."""
        G = (self.n + self.pad) // self.g
        return (torch.arange(G * self.g, device=device) < self.n).view(1, G, self.g)


def group_size_of(gran: Granularity, n: int) -> int:
    """Values per group along the last dimension for a row of length ``n``."""
    if isinstance(gran, PerGroup):
        return gran.size
    if isinstance(gran, GGUFBlock):
        return gran.sub_block
    if isinstance(gran, PEG):
        return -(-n // gran.groups)
    return n


def check_fits(gran: Granularity, shape: tuple[int, ...] | torch.Size) -> None:
    """Raise a one-line ``ValueError`` when ``gran`` cannot be applied to a tensor of ``shape``."""
    n = shape[-1]
    if isinstance(gran, PerGroup) and gran.size > n:
        raise ValueError(
            f"group size {gran.size} is larger than the row length {n} of a {tuple(shape)} tensor; "
            f"use a group size <= {n} or per-channel")
    if isinstance(gran, GGUFBlock) and gran.sub_block > n:
        raise ValueError(f"GGUF sub-block {gran.sub_block} is larger than the row length {n} of a {tuple(shape)} tensor")
    if isinstance(gran, PEG) and gran.groups > n:
        raise ValueError(f"PEG with {gran.groups} groups needs at least that many dimensions, got {n}")


def to_groups(x: Tensor, gran: Granularity, perm: Tensor | None = None) -> tuple[Tensor, GroupLayout]:
    """Reshape ``x`` to ``(R, G, g)`` for ``gran``; see the module docstring."""
    check_fits(gran, x.shape)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)  # (R, n): weights (out, in) or activations (tokens, d)
    if isinstance(gran, PEG) and gran.permute:
        if perm is None:
            rng = x2.amax(0) - x2.amin(0)
            perm = torch.argsort(rng, stable=True)
        x2 = x2[:, perm]
    else:
        perm = None
    g = group_size_of(gran, n)
    lay = GroupLayout(x.shape, n, g, isinstance(gran, (PerTensor, PEG)), perm)
    if lay.pad:
        x2 = torch.cat([x2, x2[:, -1:].expand(x2.shape[0], lay.pad)], dim=1)
    return x2.view(x2.shape[0], -1, g), lay


def ungroup(xg: Tensor, lay: GroupLayout) -> Tensor:
    """Inverse of :func:`to_groups`."""
    x2 = xg.reshape(xg.shape[0], -1)[:, : lay.n]
    if lay.perm is not None:
        inv = torch.empty_like(lay.perm)
        inv[lay.perm] = torch.arange(lay.perm.numel(), device=lay.perm.device)
        x2 = x2[:, inv]
    return x2.reshape(lay.shape)


def reduce_dims(lay: GroupLayout) -> tuple[int, ...]:
    """Dimensions of the grouped view that one scale covers."""
    return (0, 2) if lay.shared_rows else (2,)


def num_groups(gran: Granularity, shape: tuple[int, ...] | torch.Size) -> int:
    """How many scale groups a weight of ``shape`` has (for bits accounting)."""
    n = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    if isinstance(gran, PerTensor):
        return 1
    if isinstance(gran, (PerChannel, PerToken)):
        return rows
    if isinstance(gran, PEG):  # groups of ceil(n/k) dimensions: can be fewer than k when k does not divide n
        return -(-n // group_size_of(gran, n))
    return rows * -(-n // group_size_of(gran, n))
