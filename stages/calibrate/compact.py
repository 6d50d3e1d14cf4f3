"""The compact encoding of second moments (`moments: compact`, calibrate's default): pure tensor math.

A second-moment sum is symmetric, so only its upper triangle is stored. The per-expert ones, which
dominate the calibration's size (`E x (H^2 + I^2)` values per layer), are also stored in 16 bits, in a
form where 16 bits lose nothing that matters: the expert's covariance `S = sum_xxT / n - mu mu^T` as
its variances (float32) and its correlation matrix `R_ij = S_ij / sqrt(S_ii S_jj)` (float16, every
entry in [-1, 1], so it cannot overflow, and each keeps 11 significant bits relative to
`sqrt(S_ii S_jj)` whatever the channel's scale). The centred form keeps a channel's variance exact even
where its mean dominates its second moment; the mean itself comes from `sum_x`, stored as before.

Rows are copied one at a time (and mirrored in tiles) rather than through `torch.triu_indices`, whose
index tensors for a Mixtral down input (14336 wide) would take 1.6 GB.
"""

from __future__ import annotations

import torch

TILE = 1024
ROWS = 256  # rows unpacked per masked copy: its mask and float64 segment stay small at any width


def upper_size(dim: int, strict: bool) -> int:
    """Number of stored entries of a `dim x dim` upper triangle, without the diagonal when `strict`."""
    return dim * (dim - 1) // 2 if strict else dim * (dim + 1) // 2


def pack_upper(matrix: torch.Tensor, dtype: torch.dtype, strict: bool = False) -> torch.Tensor:
    """Row-major upper triangle of `matrix [D, D]` (from the diagonal, or above it when `strict`) -> [n] in `dtype`."""
    dim = matrix.shape[-1]
    out = torch.empty(upper_size(dim, strict), dtype=dtype, device=matrix.device)
    offset, skip = 0, int(strict)
    for row in range(dim - skip):
        width = dim - row - skip
        out[offset:offset + width] = matrix[row, row + skip:]
        offset += width
    return out


def unpack_upper(packed: torch.Tensor, dim: int, diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric float64 `[D, D]` matrix whose upper triangle is `packed` (see `pack_upper`).

    `diagonal [D]` given means `packed` is strict (no diagonal) and these are the diagonal's values.
    """
    strict = diagonal is not None
    full = torch.zeros(dim, dim, dtype=torch.float64, device=packed.device)
    offset, skip = 0, int(strict)
    for start in range(0, dim, ROWS):  # a block of rows per copy: one Python step per row cost 50 ms at 2048
        stop = min(start + ROWS, dim)
        upper = torch.ones(stop - start, dim, dtype=torch.bool, device=packed.device).triu_(start + skip)
        count = int(upper.sum())
        full[start:stop].masked_scatter_(upper, packed[offset:offset + count].double())
        offset += count
    if strict:
        full.diagonal().copy_(diagonal)
    for start in range(0, dim, TILE):  # mirror tile by tile: no second D x D temporary
        stop = min(start + TILE, dim)
        tile = full[start:stop, start:stop]
        tile.copy_(tile.triu() + tile.triu(1).T)
        full[stop:, start:stop] = full[start:stop, stop:].T
    return full


def encode_covariance(sum_x: torch.Tensor, sum_xxT: torch.Tensor, count: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's sums -> (variance [D] float32, correlation strict upper triangle [D(D-1)/2] float16).

    sum_x [D], sum_xxT [D, D] (any float dtype), `count` tokens. Computed in float64 in place: the
    extra memory is one `D x D` float64 matrix. A channel with zero variance gets zero correlations.
    """
    n = max(int(count), 1)
    mean = sum_x.double() / n
    covariance = sum_xxT.to(torch.float64, copy=True).div_(n)  # never the caller's tensor
    covariance.addr_(mean, mean, alpha=-1)
    variance = covariance.diagonal().clone().clamp_min_(0)
    inverse_std = torch.where(variance > 0, variance.rsqrt(), torch.zeros_like(variance))
    covariance.mul_(inverse_std[:, None]).mul_(inverse_std[None, :]).clamp_(-1, 1)
    return variance.float(), pack_upper(covariance, torch.float16, strict=True)


def decode_sum_xxT(sum_x: torch.Tensor, variance: torch.Tensor, correlation: torch.Tensor, count: int
                   ) -> torch.Tensor:
    """Inverse of `encode_covariance`: `sum_xxT [D, D]` float64 = n (D^1/2 R D^1/2 + mu mu^T)."""
    n = max(int(count), 1)
    std = variance.double().sqrt()
    ones = (variance > 0).double()
    matrix = unpack_upper(correlation, std.shape[0], diagonal=ones)
    matrix.mul_(std[:, None]).mul_(std[None, :])
    mean = sum_x.double() / n
    matrix.addr_(mean, mean)
    return matrix.mul_(n) if int(count) > 0 else matrix.zero_()
