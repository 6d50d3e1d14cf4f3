"""The measured error factor of a VQ code size (`klt-svd code_sizes`): how much of one matrix's output
energy k-means VQ at `bits` x `dim` leaves, `Tr(E C E^T) / Tr(W C W^T)` with `E = W - VQ(W)`.

Why measured and not a high-rate formula: the formula (MSE ~ 2^(-2 bits) at a fixed vector length) says
nothing about what the vector length does at 2-3 bits, nor about a codebook with few points per codeword
(a 64 x 128 expert has 2048 sub-vectors of length 4, eight per codeword at 2 bits): there k-means fits its
own matrix far better than the formula says, and that codebook is paid for in bits. So the factor is
k-means itself, cheapened: the codebook is fitted on at most `SAMPLE_PER_CODEWORD * K` of the matrix's
sub-vectors (all of them on small matrices, where that effect lives) by `ITERS` Lloyd iterations from a
seeded random draw of distinct points, and the error is measured on all of them. Deterministic: a seeded
generator and exact index-order tie-breaking; the distances in float32, chunked.
"""

from __future__ import annotations

import torch

from kbvq_cli.output_error import output_error

ITERS = 10
SAMPLE_PER_CODEWORD = 16
SEED = 0
CHUNK = 1 << 14  # sub-vectors per distance block: CHUNK x K float32 at a time


def _nearest(points: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    norms = codebook.pow(2).sum(1)
    found = [torch.addmm(norms, block, codebook.T, alpha=-2.0).argmin(1) for block in points.split(CHUNK)]
    return torch.cat(found)


def kmeans_codebook(points: torch.Tensor, k: int, iters: int = ITERS, seed: int = SEED) -> torch.Tensor:
    """A codebook [k, d] for `points` [N, d] float32: k distinct points drawn with a seeded generator (with
    repeats when N < k: then every point is a codeword and VQ is exact), then Lloyd iterations."""
    generator = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    if n <= k:
        return points[torch.arange(k) % n].clone()
    codebook = points[torch.randperm(n, generator=generator)[:k].sort().values].clone()
    for _ in range(iters):
        indices = _nearest(points, codebook)
        counts = torch.bincount(indices, minlength=k)
        sums = torch.zeros(k, points.shape[1], dtype=torch.float64).index_add_(0, indices, points.double())
        filled = counts > 0  # an empty codeword keeps its place
        codebook[filled] = (sums[filled] / counts[filled].unsqueeze(1)).float()
    return codebook


def vq_error_factor(weight: torch.Tensor, second_moment: torch.Tensor | None, bits: int, dim: int) -> float:
    """`Tr(E C E^T) / Tr(W C W^T)` of `weight` [oc, ic] VQ'd at `bits` x `dim` (C = I when None)."""
    weight = weight.float().cpu()
    oc, ic = weight.shape
    points = weight.reshape(oc * ic // dim, dim).contiguous()
    k = 2 ** (bits * dim)
    sample = points
    if points.shape[0] > SAMPLE_PER_CODEWORD * k:
        chosen = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(SEED + 1))
        sample = points[chosen[: SAMPLE_PER_CODEWORD * k].sort().values]
    codebook = kmeans_codebook(sample, k)
    error = (points - codebook[_nearest(points, codebook)]).reshape(oc, ic).double()
    if second_moment is None:
        return float(error.pow(2).sum() / weight.double().pow(2).sum().clamp_min(1e-300))
    moment = second_moment.cpu()
    return float(output_error(error, moment)) / max(float(output_error(weight, moment)), 1e-300)
