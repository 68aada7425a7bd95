"""Bit packing: round trips, exact sizes, and the little-endian bit-stream layout."""
from __future__ import annotations

import pytest
import torch

from lowbit.packing import pack_bits, unpack_bits


def oracle_pack(codes: list[int], bits: int) -> list[int]:
    """Independent oracle: a Python big integer as the LSB-first bit stream."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (i * bits)
    nbytes = -(-len(codes) * bits // 8)
    return list(acc.to_bytes(nbytes, "little")) if nbytes else []


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 13, 64, 101])
def test_roundtrip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == -(-n * bits // 8)
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.int64 and torch.equal(out, codes)
    assert packed.tolist() == oracle_pack(codes.tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_and_shapes(bits):
    top = 2**bits - 1
    codes = torch.tensor([[top, 0, top], [0, top, 1]], dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert torch.equal(unpack_bits(packed, bits, 6), codes.reshape(-1).long())
    assert packed.numel() == -(-6 * bits // 8)


def test_known_layout():
    # codes 1, 2, 3 of 2 bits: 0b11_10_01 = 57
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [0b111001]
    # 4-bit: first code in the low nibble
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    # 3-bit codes straddle bytes
    assert pack_bits(torch.tensor([7, 7, 7]), 3).tolist() == [0xFF, 0x01]


def test_unpack_rejects_short_buffer_and_pack_rejects_bad_bits():
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5)  # 5 x 4 bits need 3 bytes
    for b in (0, 9):
        with pytest.raises(ValueError):
            pack_bits(torch.zeros(4, dtype=torch.long), b)
