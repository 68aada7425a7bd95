"""Dense bit-packing of small unsigned integer codes (1..8 bits) into bytes.

Codes are written as one little-endian bit stream: code ``i`` occupies bits
``[i*b, (i+1)*b)``. The last byte is zero-padded. So ``n`` codes of ``b`` bits take exactly
``ceil(n*b/8)`` bytes, which is what the bits-per-parameter report counts.
"""
from __future__ import annotations

import torch
from torch import Tensor


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (any integer dtype, values < 2^bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8-bit codes, got {bits}")
    flat = codes.reshape(-1).to(torch.int32)
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1).to(torch.uint8)  # (n*bits,) LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as int64."""
    if bits == 8:
        return packed.reshape(-1)[:n].to(torch.int64)
    need = -(-n * bits // 8)
    if packed.numel() < need:
        raise ValueError(f"packed buffer holds {packed.numel()} bytes but {n} codes of {bits} bits need {need}")
    stream = ((packed.reshape(-1)[:need].to(torch.int32).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: n * bits].view(n, bits)
    return (stream << torch.arange(bits)).sum(1).to(torch.int64)
