"""Bit-packing of VQ indices: `n` integers of `width` bits (1-16) into ceil(n * width / 8) bytes.

Little-endian bit order: value i occupies bits [i*width, (i+1)*width) of the stream, least significant
bit first, and byte j holds stream bits [8j, 8j+8). 8- and 16-bit widths are plain byte views; other
widths (12 bits for 3-bit d=4 codebooks, 6 or 4 for d=2) go through a vectorised bit expansion.
"""

from __future__ import annotations

import math
import sys

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


def code_dtype(width: int) -> torch.dtype:
    """The resident dtype of codes of `width` bits: uint8 up to 8 bits, int16 (holding the unsigned value,
    as the kernels read it) up to 16."""
    if not 1 <= width <= 16:
        raise KbvqError(f"index width must be 1 to 16 bits (got {width})")
    return torch.uint8 if width <= 8 else torch.int16


def _word_bytes(width: int) -> int:
    """Bytes of the smallest run that holds a whole number of codes: lcm(width, 8) / 8."""
    return math.lcm(width, 8) // 8


def unpack_rows(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Rows bit-packed by `pack_indices` (one row per expert, each padded to a whole byte) -> their codes.

    packed uint8 [n, packed_size(count, width)] -> [n, count] in `code_dtype(width)`. 8 bits are the bytes
    themselves and 16 bits a little-endian int16 view (no copy in either case); other widths decode a
    group of `lcm(width, 8) / 8` bytes at a time in int32/int64, so the temporary is a few bytes per code
    instead of `unpack_indices`' 64 bits per bit.
    """
    n, nbytes = packed.shape
    if nbytes != packed_size(count, width):
        raise KbvqError(f"packed indices hold {nbytes} bytes per row, expected {packed_size(count, width)} "
                        f"for {count} values of {width} bits; the shard is corrupt")
    dtype = code_dtype(width)
    if width == 8:
        return packed
    if width == 16:
        if sys.byteorder != "little":  # the view below reads the stored little-endian pairs as host int16
            return torch.stack([unpack_indices(row, width, count) for row in packed]).to(torch.int16)
        return packed.contiguous().view(torch.int16)
    group = _word_bytes(width)
    if group > 8:  # widths like 9, 11, 13: no 64-bit word holds a whole number of them
        return torch.stack([unpack_indices(row, width, count) for row in packed]).to(dtype)
    per_word = group * 8 // width
    words_per_row = -(-count // per_word)
    data = torch.nn.functional.pad(packed, (0, words_per_row * group - nbytes))
    word_dtype = torch.int32 if group * 8 <= 31 else torch.int64
    data = data.reshape(n, words_per_row, group).to(word_dtype)
    shifts = torch.arange(group, device=packed.device, dtype=word_dtype) * 8
    words = (data << shifts).sum(-1, dtype=word_dtype)
    shifts = torch.arange(per_word, device=packed.device, dtype=word_dtype) * width
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return codes.reshape(n, -1)[:, :count].to(dtype)
