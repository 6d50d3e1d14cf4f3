"""Bit-packing of VQ indices: `n` integers of `width` bits (1-16) into ceil(n * width / 8) bytes.

Little-endian bit order: value i occupies bits [i*width, (i+1)*width) of the stream, least significant
bit first, and byte j holds stream bits [8j, 8j+8). 8- and 16-bit widths are plain byte views; other
widths (12 bits for 3-bit d=4 codebooks, 6 or 4 for d=2) go through a vectorised bit expansion.
"""

from __future__ import annotations

import torch

from kbvq_cli.errors import KbvqError


def packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def pack_indices(values: torch.Tensor, width: int) -> torch.Tensor:
    """values: any integer tensor with entries in [0, 2^width) -> uint8 [packed_size(numel, width)]."""
    if not 1 <= width <= 16:
        raise KbvqError(f"index width must be 1 to 16 bits (got {width})")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << width):
        raise KbvqError(f"an index does not fit in {width} bits; the codebook and the bit width disagree")
    if width == 8:
        return flat.to(torch.uint8)
    if width == 16:
        low, high = (flat & 0xFF).to(torch.uint8), (flat >> 8).to(torch.uint8)
        return torch.stack([low, high], dim=1).reshape(-1)
    shifts = torch.arange(width, device=flat.device)
    bits = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    bits = torch.nn.functional.pad(bits, (0, packed_size(flat.numel(), width) * 8 - bits.numel()))
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (bits.reshape(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The inverse of `pack_indices`: uint8 bytes -> int64 [count]."""
    if packed.numel() != packed_size(count, width):
        raise KbvqError(f"packed indices hold {packed.numel()} bytes, expected {packed_size(count, width)} "
                        f"for {count} values of {width} bits; the shard is corrupt")
    data = packed.to(torch.int64)
    if width == 8:
        return data
    if width == 16:
        pairs = data.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 8)
    bits = ((data.unsqueeze(1) >> torch.arange(8, device=data.device)) & 1).reshape(-1)[: count * width]
    weights = 1 << torch.arange(width, device=data.device)
    return (bits.reshape(count, width) * weights).sum(1)
