"""Helpers every backend shares: code dtypes, segments of expert-sorted rows, the LUT-or-not rule.

A *segment* is `(expert, start, end)`: rows `start:end` of the expert-sorted input go to `expert`.
"""

from __future__ import annotations

import torch

Segment = tuple[int, int, int]

CODE_DTYPES = (torch.uint8, torch.int16)


def code_bytes(indices: torch.Tensor) -> int:
    """1 for uint8 codes (8 bits), 2 for int16 codes (12 or 16 bits holding the unsigned value)."""
    if indices.dtype == torch.uint8:
        return 1
    if indices.dtype == torch.int16:
        return 2
    raise TypeError(f"indices must be torch.uint8 or torch.int16, got {indices.dtype}")


def codes_long(indices: torch.Tensor) -> torch.Tensor:
    """Codes as int64 (what torch's gathers take); int16 codes are read as unsigned, so 0x8000.. stay positive."""
    codes = indices.to(torch.int64)
    return codes & 0xFFFF if indices.dtype == torch.int16 else codes


def use_lut(num_codes: int, oc: int) -> bool:
    """Whether a decode GEMV should go through a lookup table.

    Building the table costs `K * ic` multiply-adds per token, the GEMV it replaces `oc * ic`, so the table
    only pays when K is well below oc: 8-bit codes (K=256) against Qwen1.5-MoE's oc of 1408/2048 use it,
    12- and 16-bit codes (K=4096/65536) gather codebook rows directly instead.
    """
    return 2 * num_codes <= oc


def segments_from_offsets(offsets: torch.Tensor | list[int], num_experts: int, num_rows: int) -> list[Segment]:
    """The non-empty segments of `offsets` (int [n+1], from 0 to num_rows, non-decreasing; expert e owns rows
    offsets[e]:offsets[e+1])."""
    bounds = offsets.tolist() if isinstance(offsets, torch.Tensor) else list(offsets)
    if len(bounds) != num_experts + 1:
        raise ValueError(f"offsets has {len(bounds)} entries, expected num_experts + 1 = {num_experts + 1}")
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("offsets must start at 0 and never decrease")
    if bounds[-1] != num_rows:
        raise ValueError(f"offsets end at row {bounds[-1]} but x has {num_rows} rows")
    return [(e, bounds[e], bounds[e + 1]) for e in range(num_experts) if bounds[e + 1] > bounds[e]]


def check_experts(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate one projection's inputs and return `(n, oc, K, d)`.

    x [N, ic] float; indices [n, oc, ic/d] uint8|int16; codebook [n, K, d] float.
    """
    code_bytes(indices)
    if x.dim() != 2 or indices.dim() != 3 or codebook.dim() != 3:
        raise ValueError(f"expected x [N, ic], indices [n, oc, J], codebook [n, K, d]; got "
                         f"{tuple(x.shape)}, {tuple(indices.shape)}, {tuple(codebook.shape)}")
    n, oc, groups = indices.shape
    _, num_codes, d = codebook.shape
    if codebook.shape[0] != n or groups * d != x.shape[1]:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, indices {tuple(indices.shape)}, "
                         f"codebook {tuple(codebook.shape)} (need ic = J * d and one codebook per expert)")
    if not (x.is_floating_point() and codebook.is_floating_point()):
        raise TypeError("x and codebook must be floating point")
    return n, oc, num_codes, d
