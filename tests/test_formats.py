"""Number formats: value tables checked against an independent bit-pattern decoder and torch's float8."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.config import parse_format
from lowbit.formats import (FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, NF4, FloatFormat, IntFormat, PowerOfTwo,
                            code_bits, emax, max_value, value_table)

# METHODS.md section 2.5, quoted to 4 decimals.
NF4_METHODS = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0,
               0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1]


def decode_minifloat(code: int, e_bits: int, m_bits: int, kind: str) -> float:
    """Independent oracle: the value of one sign|exponent|mantissa bit pattern (nan for NaN, +-inf for inf)."""
    sign = -1.0 if (code >> (e_bits + m_bits)) & 1 else 1.0
    e = (code >> m_bits) & ((1 << e_bits) - 1)
    m = code & ((1 << m_bits) - 1)
    bias = (1 << (e_bits - 1)) - 1
    e_top = (1 << e_bits) - 1
    if kind == "ieee" and e == e_top:
        return sign * math.inf if m == 0 else math.nan
    if kind == "fn" and e == e_top and m == (1 << m_bits) - 1:
        return math.nan
    if e == 0:
        return sign * (m / (1 << m_bits)) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << m_bits)) * 2.0 ** (e - bias)


def oracle_table(e_bits: int, m_bits: int, kind: str) -> list[float]:
    vals = {decode_minifloat(c, e_bits, m_bits, kind) for c in range(1 << (1 + e_bits + m_bits))}
    vals = {0.0 if v == 0 else v for v in vals if math.isfinite(v)}  # -0 and +0 collapse
    return sorted(vals)


FLOATS = [(FP8_E4M3, 4, 3, "fn", 448.0, 126), (FP8_E5M2, 5, 2, "ieee", 57344.0, 123),
          (FP6_E3M2, 3, 2, "none", 28.0, 31), (FP6_E2M3, 2, 3, "none", 7.5, 31), (FP4_E2M1, 2, 1, "none", 6.0, 7)]


def test_fp4_e2m1_positive_values_exact():
    t = value_table(FP4_E2M1).tolist()
    assert [v for v in t if v >= 0] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert [v for v in t if v < 0] == [-6, -4, -3, -2, -1.5, -1, -0.5]
    assert FP4_E2M1.positive_values() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt,e,m,kind,top,n_pos", FLOATS, ids=lambda v: getattr(v, "name", None))
def test_float_tables_match_independent_decoder(fmt, e, m, kind, top, n_pos):
    t = value_table(fmt)
    assert t.dtype == torch.float32
    assert t.tolist() == oracle_table(e, m, kind)
    assert max_value(fmt) == top == t.max().item() == -t.min().item()
    assert (t > 0).sum().item() == n_pos and (t < 0).sum().item() == n_pos
    assert t.numel() == 2 * n_pos + 1  # one zero
    assert torch.all(t[1:] > t[:-1])  # sorted, distinct
    assert fmt.bits == code_bits(fmt) == 1 + e + m


@pytest.mark.parametrize("fmt,dtype", [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)])
def test_fp8_tables_match_torch_native_dtypes(fmt, dtype):
    native = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    native = native[torch.isfinite(native)]
    native = torch.unique(native)  # sorted; -0 and +0 compare equal, so they collapse
    assert torch.equal(value_table(fmt), native + 0.0)  # + 0.0 turns a surviving -0 into +0


def test_fp8_counts_and_max():
    assert value_table(FP8_E4M3).numel() == 253  # 126 positive non-zero, 126 negative, zero
    assert value_table(FP8_E5M2).numel() == 247
    assert max_value(FP8_E4M3) == 448.0 and max_value(FP8_E5M2) == 57344.0
    assert max_value(FP6_E3M2) == 28.0 and max_value(FP6_E2M3) == 7.5
    # smallest subnormals
    assert value_table(FP8_E4M3)[127].item() == 2.0**-9
    assert value_table(FP8_E5M2)[124].item() == 2.0**-16


def test_mx_emax_elem_matches_methods():
    # METHODS.md 2.4 (torchao constants.py): E4M3 = 8, E5M2 = 15, E2M3 = 2, E3M2 = 4, E2M1 = 2
    assert [emax(f) for f in (FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1)] == [8, 15, 2, 4, 2]
    assert emax(IntFormat(8), symmetric=True) == 6  # 127 -> 2^6


def test_nf4_levels_match_methods_list():
    t = value_table(NF4())
    assert t.numel() == 16
    assert [round(v, 4) for v in t.tolist()] == NF4_METHODS
    assert (t < 0).sum().item() == 7 and (t > 0).sum().item() == 8 and (t == 0).sum().item() == 1
    assert code_bits(NF4()) == 4 and max_value(NF4()) == 1.0


def nf4_oracle_levels() -> torch.Tensor:
    """QLoRA's construction: normal quantiles of 8 (positive) and 7 (negative) equal steps of probability from
    offset 0.9677083 down to 0.5, plus an exact zero, normalised to max 1."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    off = 0.9677083
    pos = normal.icdf(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.max()


def test_nf4_levels_are_normalised_normal_quantiles():
    assert torch.allclose(value_table(NF4()).double(), nf4_oracle_levels(), rtol=0, atol=1e-6)


def test_power_of_two_4bit_table():
    mags = [1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]  # 2^-k, k = 0 .. 2^3 - 2
    expect = sorted([-m for m in mags] + [0.0] + mags)
    assert value_table(PowerOfTwo(4)).tolist() == expect
    assert value_table(PowerOfTwo(2)).tolist() == [-1.0, 0.0, 1.0]
    for b in range(2, 9):
        t = value_table(PowerOfTwo(b))
        assert t.numel() == 2**b - 1 <= 2**b  # fits b-bit codes
        pos = t[t > 0]
        assert torch.equal(torch.log2(pos), torch.round(torch.log2(pos)))  # exact powers of two
        assert pos.min().item() == 2.0 ** -(2 ** (b - 1) - 2)


@pytest.mark.parametrize("b", range(1, 9))
def test_int_format_max(b):
    f = IntFormat(b)
    assert f.qmax == 2**b - 1 and code_bits(f) == b and f.name == f"int{b}"
    assert max_value(f, symmetric=False) == 2**b - 1
    if b > 1:
        assert max_value(f, symmetric=True) == 2 ** (b - 1) - 1
    with pytest.raises(TypeError):
        value_table(f)


@pytest.mark.parametrize("make", [lambda: IntFormat(0), lambda: IntFormat(9), lambda: PowerOfTwo(1),
                                  lambda: PowerOfTwo(9), lambda: FloatFormat(0, 3), lambda: FloatFormat(5, 3),
                                  lambda: FloatFormat(4, 3, "bogus")])
def test_out_of_range_formats_raise(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("name", ["int0", "int9", "pow2_1", "pow2_9"])
def test_out_of_range_format_names_raise(name):
    with pytest.raises(ValueError, match="1..8|2..8"):
        parse_format(name)


def test_table_is_cached_but_not_shared_mutable():
    a = value_table(FP4_E2M1)
    a[0] = 123.0
    assert value_table(FP4_E2M1)[0].item() == -6.0
