"""Number formats: what values one code can stand for, before scaling.

Each format is a small frozen dataclass. Two families:

* ``IntFormat(bits)``: uniform integer codes ``q in [0, 2^b - 1]``; the value is ``s * (q - z)``.
  Symmetric or asymmetric is chosen in :class:`lowbit.quantizer.QuantSpec`.
* Table formats (``FloatFormat``, ``NF4``, ``PowerOfTwo``): a fixed, sorted table ``L`` of values
  at unit scale; the code is an index into ``L`` and the value is ``s * L[q]``. ``s`` maps the
  group's absolute maximum onto ``max(L)``.

Tables are built exactly (METHODS.md section 2.4-2.5):

* FP8 E4M3 ("fn": no inf, only S.1111.111 is NaN) max 448; FP8 E5M2 (IEEE: top exponent reserved)
  max 57344; FP6 E3M2 max 28; FP6 E2M3 max 7.5; FP4 E2M1 ``{0, .5, 1, 1.5, 2, 3, 4, 6}``. Subnormals
  included, +0 and -0 collapse to one value (so a table has fewer values than 2^bits codes).
* NF4 (QLoRA): the 16 normal-float levels, 7 negative and 8 positive non-zero values.
* Power-of-two (logarithmic): ``{0} U {+-2^-k : k = 0 .. 2^(b-1) - 2}``.

``BCQ(q)`` (binary-coding quantization, METHODS.md section 2.6) is neither: each group fits its own
``2^q`` levels ``z + sum_i alpha_i b_i`` (``b_i = +-1``), so it has no fixed table; see
:mod:`lowbit.quantizer` and :mod:`lowbit.bcq`.

MX (OCP microscaling) and block floating point are *not* formats of their own: they are a
table or integer format with a shared power-of-two (E8M0) scale per block of 32 (or any size),
i.e. ``QuantSpec(fmt, PerGroup(32), scale="e8m0")``. See :func:`lowbit.config.parse_spec`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

# QLoRA's NF4 levels (quantiles of N(0,1) normalised to [-1, 1]); METHODS.md quotes them to 4 digits.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class IntFormat:
    """Uniform integer codes of ``bits`` bits (1..8)."""

    bits: int

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"integer bit-width must be 1..8, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


@dataclass(frozen=True)
class FloatFormat:
    """A minifloat with ``exp`` exponent and ``man`` mantissa bits plus a sign bit.

    ``special``: ``"ieee"`` reserves the top exponent for inf/NaN (E5M2), ``"fn"`` reserves only
    the all-ones code for NaN (E4M3), ``"none"`` makes every code finite (FP6, FP4).
    """

    exp: int
    man: int
    special: str = "none"

    def __post_init__(self):
        if self.exp < 1 or self.man < 0 or self.exp + self.man > 7:
            raise ValueError(f"unsupported minifloat e{self.exp}m{self.man}: need exp>=1 and 1+exp+man <= 8 bits")
        if self.special not in ("none", "fn", "ieee"):
            raise ValueError(f"special must be 'none', 'fn' or 'ieee', got {self.special!r}")

    @property
    def bits(self) -> int:
        return 1 + self.exp + self.man

    @property
    def bias(self) -> int:
        return 2 ** (self.exp - 1) - 1

    @property
    def name(self) -> str:
        return f"fp{self.bits}_e{self.exp}m{self.man}"

    def positive_values(self) -> list[float]:
        """All finite non-negative values, built from the bit fields (subnormals included)."""
        vals = []
        top_e = 2**self.exp - 1
        for e in range(2**self.exp):
            if self.special == "ieee" and e == top_e:
                continue
            for m in range(2**self.man):
                if self.special == "fn" and e == top_e and m == 2**self.man - 1:
                    continue  # S.1111.111 is NaN in E4M3
                if e == 0:  # subnormal
                    vals.append(2.0 ** (1 - self.bias) * (m / 2**self.man))
                else:
                    vals.append(2.0 ** (e - self.bias) * (1 + m / 2**self.man))
        return sorted(set(vals))


@dataclass(frozen=True)
class NF4:
    """QLoRA 4-bit NormalFloat."""

    @property
    def bits(self) -> int:
        return 4

    @property
    def name(self) -> str:
        return "nf4"


@dataclass(frozen=True)
class PowerOfTwo:
    """Logarithmic format: a sign bit and 2^(b-1) magnitudes {0, 2^-(2^(b-1)-2), ..., 1/2, 1}."""

    bits: int

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"power-of-two bit-width must be 2..8, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"pow2_{self.bits}"


@dataclass(frozen=True)
class BCQ:
    """Binary-coding quantization with ``bits`` = q sign planes (1..4): ``w ~ sum_i alpha_i b_i + z``.

    Per group: q fp16 scales ``alpha_i`` and one fp16 offset ``z``; per weight: q bits, packed into
    one code with bit ``i`` = ``(b_i + 1) / 2``.
    """

    bits: int

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 4:
            raise ValueError(f"BCQ needs 1..4 bit planes, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"bcq{self.bits}"


Format = IntFormat | FloatFormat | NF4 | PowerOfTwo | BCQ
TableFormat = FloatFormat | NF4 | PowerOfTwo

FP8_E4M3 = FloatFormat(4, 3, "fn")
FP8_E5M2 = FloatFormat(5, 2, "ieee")
FP6_E3M2 = FloatFormat(3, 2)
FP6_E2M3 = FloatFormat(2, 3)
FP4_E2M1 = FloatFormat(2, 1)


@lru_cache(maxsize=None)
def _table(fmt: TableFormat) -> tuple[float, ...]:
    if isinstance(fmt, NF4):
        return NF4_LEVELS
    if isinstance(fmt, PowerOfTwo):
        mags = [2.0**-k for k in range(2 ** (fmt.bits - 1) - 1)]
        return tuple(sorted([-m for m in mags] + [0.0] + mags))
    pos = fmt.positive_values()
    return tuple(sorted([-v for v in pos if v > 0] + pos))


def value_table(fmt: TableFormat) -> torch.Tensor:
    """The sorted representable values of a table format at unit scale (float32)."""
    if isinstance(fmt, IntFormat):
        raise TypeError("integer formats have no value table; they are uniform")
    if isinstance(fmt, BCQ):
        raise TypeError("BCQ levels are fitted per group; there is no fixed value table")
    return torch.tensor(_table(fmt), dtype=torch.float32)


def max_value(fmt: Format, symmetric: bool = True) -> float:
    """Largest positive representable value at unit scale (integer formats: the top signed code)."""
    if isinstance(fmt, IntFormat):
        return float(2 ** (fmt.bits - 1) - 1) if symmetric and fmt.bits > 1 else float(fmt.qmax)
    return max(_table(fmt))


def emax(fmt: Format, symmetric: bool = True) -> int:
    """Exponent of the largest power of two <= the format's max (MX's ``emax_elem``)."""
    m = max_value(fmt, symmetric)
    return math.floor(math.log2(m)) if m > 0 else 0


def code_bits(fmt: Format) -> int:
    """Bits one stored code takes."""
    return fmt.bits if not isinstance(fmt, NF4) else 4
