"""`reference` backend: each expert's matrix dequantized whole, then one matmul (what `kbvq_cli.packed.reference` does).

Not for speed; the other backends are tested against it and against float64.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from kbvq_cli.kernels.common import Segment, codes_long


def dequantize(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """`W[o, j*d:(j+1)*d] = codebook[indices[o, j]]`: indices [oc, J] uint8|int16, codebook [K, d] -> [oc, J*d]
    in the codebook's dtype."""
    return functional.embedding(codes_long(indices), codebook).reshape(indices.shape[0], -1)


def experts_forward(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor,
                    codebook: torch.Tensor) -> torch.Tensor:
    """x [N, ic] float, indices [n, oc, J], codebook [n, K, d] -> [N, oc] float32 (rows of no segment are 0)."""
    out = x.new_zeros(x.shape[0], indices.shape[1], dtype=torch.float32)
    for expert, start, end in segments:
        weight = dequantize(indices[expert], codebook[expert]).float()
        out[start:end] = x[start:end].float() @ weight.T
    return out
