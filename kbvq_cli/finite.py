"""Counting NaN/inf entries of a tensor without a second tensor of its size.

A NaN weight or statistic does not fail where it enters: it spreads through every product after it
and surfaces stages later as a misleading error (klt-svd's "overflows float16"). Readers check where
tensors enter, and name the tensor. The check goes chunk by chunk, so an embedding of hundreds of
megabytes costs a 16 MB mask, not one of its own size.
"""

from __future__ import annotations

CHUNK = 1 << 24  # elements per isfinite() mask


def count_non_finite(tensor) -> int:
    """The number of NaN or infinite entries of a floating-point tensor (0 for integer tensors)."""
    import torch

    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[start:start + CHUNK])).sum()) for start in range(0, flat.numel(), CHUNK))
