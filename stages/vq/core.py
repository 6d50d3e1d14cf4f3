"""Vector quantization of one weight matrix (docs/method.md §3): k-means++ then Lloyd, exact assignment.

A matrix `W [oc, ic]` is cut into sub-vectors of `d` consecutive input weights; one codebook of
`K = 2^(bits*d)` codewords per matrix; each sub-vector is replaced by its nearest codeword.
Deterministic: the seed drives a `torch.Generator` on the points' device; ties and empty clusters are
resolved by index order.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.bit_limits import vq_problem
from kbvq_cli.threads import torch_threads
from stages.vq.backends import AssignBackend



def codebook_size(bits: int, dim: int) -> int:
    problem = vq_problem(bits, dim)
    if problem is not None:
        raise KbvqError(problem)
    return 2 ** (bits * dim)


def to_subvectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """[oc, ic] -> [oc * ic / dim, dim], row by row along the input dimension."""
    oc, ic = weight.shape
    if ic % dim:
        raise KbvqError(f"input dimension {ic} is not a multiple of the vector length {dim}; choose --dim 2 or 4")
    return weight.reshape(oc * ic // dim, dim)


def dequantize(indices: torch.Tensor, codebook: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """indices [oc, ic/d] (int), codebook [K, d] -> W~ [oc, ic] in the codebook's dtype."""
    return codebook[indices.long()].reshape(shape)


@dataclass
class VqResult:
    codebook: torch.Tensor  # [K, d] float32
    indices: torch.Tensor  # [oc, ic/d] int64
    objective: list[float] = field(default_factory=list)  # sum of squared errors after each assignment
    iterations: int = 0  # Lloyd iterations actually run (fewer when the assignment stopped changing)


def _one_cpu_thread(device: torch.device):
    """k-means++ is a long run of small vector operations: on the CPU, thread start-up and
    barriers cost more than they save, and on a loaded machine a barrier waiting for a descheduled
    thread made k-means++ 50x slower here (63 s instead of 1.2 s for 4096 codewords). Run them on one
    thread. (faiss's search keeps its own threads.)"""
    return torch_threads(1) if device.type == "cpu" else nullcontext()


def kmeans_pp(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2. -> [k, d].

    The draw is an inverse-CDF lookup (cumulative sum, one uniform number, binary search): exact,
    seeded, and several times faster than `torch.multinomial` over a large population.
    """
    n = points.shape[0]
    exact = points.double()
    squared_norms = exact.pow(2).sum(1)
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centres = torch.empty(k, points.shape[1], dtype=points.dtype, device=points.device)
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64, device=generator.device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float64, device=points.device)
    distance = torch.empty_like(nearest)
    choice = first
    for i in range(k):
        if i:
            cumulative = nearest.cumsum(0)
            total = cumulative[-1]
            if total <= 0:
                # every point is a centre already (fewer distinct points than codewords): the rest repeat
                # the points in order, deterministically, with no distance left to update (a 12-bit
                # codebook on a small matrix spent most of its seeding here)
                centres[i:] = points[torch.arange(i, k, device=points.device) % n]
                break
            choice = min(int(torch.searchsorted(cumulative, uniforms[i] * total, right=True)), n - 1)
        centres[i] = points[choice]
        centre = exact[choice]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one matrix-vector product per centre, in float64
        torch.addmv(squared_norms + centre.dot(centre), exact, centre, alpha=-2.0, out=distance)
        torch.minimum(nearest, distance.clamp_min_(0), out=nearest)
    return centres


def cluster_sums(points: torch.Tensor, indices: torch.Tensor, k: int, columns: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of the points (float64 [k, d]) and counts ([k]), deterministically.

    CPU: each (cluster, coordinate) sum adds its points in index order in float64, in one compiled
    pass over the points (`kbvq_cli.kernels.cpu_backend.cluster_sums`: 2.1 against 7 ms for a 1408 x
    2048 matrix, one thread) where the kernels build, else one weighted `bincount` per coordinate (the
    same sums, bit for bit), the coordinates on parallel threads. CUDA: floating-point atomics would make
    the sums order-dependent, so the points are sorted by cluster and summed by differences of a float64
    cumulative sum. `columns` ([d, N] float64, contiguous) may be passed to reuse the bincount path's
    conversion across calls.
    """
    if points.device.type == "cpu":
        if compiled_sums(points, indices):
            from kbvq_cli.kernels import cpu_backend

            return cpu_backend.cluster_sums(points, indices, k)
        return bincount_cluster_sums(points, indices, k, columns)
    counts = torch.bincount(indices, minlength=k)
    return sorted_cluster_sums(points, indices, counts), counts


def compiled_sums(points: torch.Tensor, indices: torch.Tensor) -> bool:
    """Whether `cluster_sums` takes the compiled pass for these tensors (CPU, float32 points, int64
    indices, contiguous, and the kernels build here)."""
    from kbvq_cli.kernels import cpu_backend

    return (points.device.type == "cpu" and points.dtype == torch.float32 and indices.dtype == torch.int64
            and points.is_contiguous() and indices.is_contiguous() and cpu_backend.available())


def bincount_cluster_sums(points: torch.Tensor, indices: torch.Tensor, k: int, columns: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_sums` on the CPU without the compiled kernels: one weighted `bincount` per coordinate (a
    sequential scatter-add, several times faster than `index_add_`), the coordinates on parallel threads."""
    counts = torch.bincount(indices, minlength=k)
    columns = float64_columns(points) if columns is None else columns
    sums = _column_pool().map(lambda col: torch.bincount(indices, weights=col, minlength=k), columns)
    return torch.stack(list(sums), 1), counts


def float64_columns(points: torch.Tensor) -> torch.Tensor:
    """points [N, d] -> [d, N] float64, contiguous: converted while transposed, in one pass (converting
    first and then copying `[N, d]` into `[d, N]` took 10x as long, 47 ms for a 1408 x 2048 matrix)."""
    return points.T.to(torch.float64, memory_format=torch.contiguous_format)


_POOL: list = []


def _column_pool():
    """Threads for the per-coordinate bincounts: each is sequential inside torch (and releases the GIL),
    so the d coordinates run side by side on torch's thread count; each sum is the same as alone."""
    from concurrent.futures import ThreadPoolExecutor

    if not _POOL or _POOL[0][0] != torch.get_num_threads():
        _POOL[:] = [(torch.get_num_threads(), ThreadPoolExecutor(max(1, torch.get_num_threads())))]
    return _POOL[0][1]


def sorted_cluster_sums(points: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The GPU path of `cluster_sums` (float64 [k, d]), free of atomics: sort by cluster, then differences
    of a float64 cumulative sum. Device-independent, so it is tested on the CPU too."""
    order = torch.argsort(indices, stable=True)
    cumulative = torch.nn.functional.pad(points.double()[order].cumsum(0), (0, 0, 1, 0))
    ends = counts.cumsum(0)
    return cumulative[ends] - cumulative[ends - counts]


def _update(points: torch.Tensor, indices: torch.Tensor, distances: torch.Tensor, k: int,
            columns: torch.Tensor | None = None) -> torch.Tensor:
    """New centres as cluster means; an empty cluster takes the worst-served point."""
    sums, counts = cluster_sums(points, indices, k, columns)
    centres = (sums / counts.clamp_min(1).unsqueeze(1)).to(points.dtype)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        # Re-seed on the points farthest from their codeword: this can only lower the objective.
        worst = torch.topk(distances, min(empty.numel(), points.shape[0])).indices.sort().values
        centres[empty[: worst.numel()]] = points[worst]
    return centres


def sum_squared_error(points: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> float:
    """Exact sum of squared errors, float64."""
    return float((points.double() - codebook.double()[indices]).pow(2).sum())


# k-means++ is sequential in k (one pass over the points per centre); seeding from a seeded sample of
# this many points per codeword keeps it to 0.3 s for 4096 codewords, and Lloyd then uses all points.
INIT_POINTS_PER_CODEWORD = 8


def kmeans(points: torch.Tensor, k: int, iters: int, seed: int, backend: AssignBackend,
           on_iteration: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, list, int]:
    """k-means++ then up to `iters` Lloyd iterations. points [N, d] float32 -> (codebook, indices, objective, iters).

    (Hamerly-style bound pruning was measured here and lost: with 4096 codewords in 4 dimensions the
    codewords are so close that the bounds prune almost nothing.)
    """
    generator = torch.Generator(device=points.device).manual_seed(seed)
    sample = points
    if points.shape[0] > INIT_POINTS_PER_CODEWORD * k:
        chosen = torch.randperm(points.shape[0], generator=generator, device=points.device)
        sample = points[chosen[: INIT_POINTS_PER_CODEWORD * k].sort().values]
    with _one_cpu_thread(points.device):
        codebook = kmeans_pp(sample, k, generator)
    indices, distances = backend.assign(points, codebook)
    objective, done = [float(distances.sum(dtype=torch.float64))], 0
    # converted once, for the bincount path of the centroid update (the compiled one reads the points)
    columns = float64_columns(points) if points.device.type == "cpu" and not compiled_sums(points, indices) else None
    for step in range(iters):
        # No thread switch here: torch and faiss share one OpenMP runtime, and setting the thread count
        # around every update cost 0.4-0.6 s per 100 iterations; the update's sums are one compiled
        # pass (or d bincounts on threads of their own, `cluster_sums`), its [K, d] arithmetic is below
        # torch's grain size.
        codebook = _update(points, indices, distances, k, columns)
        new_indices, distances = backend.assign(points, codebook)
        objective.append(float(distances.sum(dtype=torch.float64)))
        done = step + 1
        if on_iteration is not None:
            on_iteration(done, objective[-1])
        converged = torch.equal(new_indices, indices)
        indices = new_indices
        if converged:  # same assignment -> same means: every later iteration is a no-op
            break
    return codebook, indices, objective, done


def vq_quantize(weight: torch.Tensor, bits: int, dim: int, iters: int, seed: int, backend: AssignBackend,
                on_iteration: Callable[[int, float], None] | None = None) -> VqResult:
    """Quantize `weight [oc, ic]` with its own codebook of 2^(bits*dim) codewords of length `dim`."""
    k = codebook_size(bits, dim)
    points = to_subvectors(weight.float(), dim).contiguous()
    codebook, indices, objective, done = kmeans(points, k, iters, seed, backend, on_iteration)
    return VqResult(codebook, indices.reshape(weight.shape[0], -1), objective, done)
