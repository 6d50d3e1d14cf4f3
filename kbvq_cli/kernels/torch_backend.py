"""`torch` backend: vectorised pure torch, no compiler: the fallback that runs wherever torch does.

Decode (a few rows per expert) goes through a lookup table, prefill dequantizes one tile of output rows at
a time and multiplies it with torch's matmul; neither holds an expert's whole dense matrix.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from kbvq_cli.kernels.common import Segment, codes_long, use_lut

# Up to this many rows per expert the LUT wins in pure torch: for one row it moves less memory than
# dequantizing (5.6 against 9.0 ms at 1408x2048 on a loaded machine), from two rows on its [rows, oc, J]
# gather costs more (12.7 against 4.7 ms). docs/kernels.md has the measurements.
DECODE_MAX_ROWS = 1
# Floats in one dequantized prefill tile (4 MiB): small enough for the cache, large enough for matmul.
TILE_ELEMENTS = 1 << 20


def lut_matmul(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """LUT GEMV: x [T, ic] float32, indices [oc, J] uint8|int16, codebook [K, d] float32 -> [T, oc] float32.

    `lut[t, j, c] = x[t, j*d:(j+1)*d] . codebook[c]`, then `y[t, o] = sum_j lut[t, j, indices[o, j]]`.
    """
    rows, (oc, groups), (num_codes, d) = x.shape[0], indices.shape, codebook.shape
    lut = (x.reshape(rows, groups, d) @ codebook.T).reshape(rows, groups * num_codes)
    # Flat positions j*K + code in the [J, K] table of each row.
    flat = codes_long(indices) + torch.arange(groups, device=x.device).mul_(num_codes)
    return lut[:, flat].sum(-1)


def tiled_matmul(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                 dequantize_tile=None) -> torch.Tensor:
    """Prefill: x [T, ic] float32, indices [oc, J], codebook [K, d] float32 -> [T, oc] float32, one tile of
    output rows dequantized at a time. `dequantize_tile(indices_tile, codebook) -> [rows, ic]` defaults to
    an embedding lookup (the `cpu` backend passes its compiled one)."""
    rows, ic = x.shape
    oc = indices.shape[0]
    tile = max(1, TILE_ELEMENTS // ic)
    out = x.new_empty(rows, oc)
    for o0 in range(0, oc, tile):
        codes = indices[o0:o0 + tile]
        if dequantize_tile is None:
            weight = functional.embedding(codes_long(codes), codebook).reshape(codes.shape[0], ic)
        else:
            weight = dequantize_tile(codes, codebook)
        out[:, o0:o0 + tile] = x @ weight.T
    return out


def experts_forward(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor,
                    codebook: torch.Tensor) -> torch.Tensor:
    """x [N, ic] float, indices [n, oc, J], codebook [n, K, d] -> [N, oc] float32 (rows of no segment are 0)."""
    oc, num_codes = indices.shape[1], codebook.shape[1]
    x = x.float()
    out = x.new_zeros(x.shape[0], oc)
    for expert, start, end in segments:
        decode = end - start <= DECODE_MAX_ROWS and use_lut(num_codes, oc)
        matmul = lut_matmul if decode else tiled_matmul
        out[start:end] = matmul(x[start:end], indices[expert], codebook[expert].float())
    return out
