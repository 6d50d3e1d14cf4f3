"""k-means for several experts of one layer at once, on the torch backend (for CUDA).

The same algorithm as `stages.vq.core.kmeans`, vectorised over a leading expert dimension: k-means++
runs in lockstep (each expert draws from its own seeded generator, in the same order as the
one-expert path), assignment is one batched matmul per chunk, and the centroid update one
deterministic scatter over the flattened (expert, cluster) index. Experts that have converged are
fixed points of the update, so running them on changes nothing.

On a GPU this turns E small kernels per step into one; on the CPU it is not faster (see
benchmarks/bench_vq.py --batched), so the stage batches only when asked to (`vq.expert_batch`).
"""

from __future__ import annotations

import torch

from stages.vq.core import INIT_POINTS_PER_CODEWORD, cluster_sums


def _draws(n: int, k: int, seed: int, device) -> tuple[torch.Tensor | None, int, torch.Tensor]:
    """The random numbers the one-expert path draws, in its order: sample, first centre, uniforms."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = None
    if n > INIT_POINTS_PER_CODEWORD * k:
        sample = torch.randperm(n, generator=generator, device=device)[: INIT_POINTS_PER_CODEWORD * k].sort().values
    size = n if sample is None else sample.numel()
    first = int(torch.randint(size, (1,), generator=generator, device=device))
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64, device=device)
    return sample, first, uniforms


def kmeans_pp_batched(points: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """points [B, N, d] -> centres [B, k, d], k-means++ per expert, in lockstep."""
    batch, n, _ = points.shape
    draws = [_draws(n, k, seed, points.device) for _ in range(batch)]
    sample = torch.stack([points[b] if s is None else points[b, s] for b, (s, _, _) in enumerate(draws)])
    exact = sample.double()
    norms = exact.pow(2).sum(2)  # [B, M]
    uniforms = torch.stack([u for _, _, u in draws])  # [B, k]
    choice = torch.tensor([f for _, f, _ in draws], device=points.device)
    rows = torch.arange(batch, device=points.device)
    centres = torch.empty(batch, k, points.shape[2], dtype=points.dtype, device=points.device)
    nearest = torch.full(norms.shape, float("inf"), dtype=torch.float64, device=points.device)
    for i in range(k):
        if i:
            cumulative = nearest.cumsum(1)
            total = cumulative[:, -1:]
            found = torch.searchsorted(cumulative, uniforms[:, i:i + 1] * total, right=True).squeeze(1)
            choice = torch.where(total.squeeze(1) > 0, found.clamp_max(sample.shape[1] - 1),
                                 torch.full_like(found, i % sample.shape[1]))
        centres[:, i] = sample[rows, choice]
        centre = exact[rows, choice]  # [B, d]
        distance = norms + centre.pow(2).sum(1, keepdim=True) - 2 * torch.bmm(exact, centre.unsqueeze(2)).squeeze(2)
        torch.minimum(nearest, distance.clamp_min(0), out=nearest)
    return centres


def assign_batched(points: torch.Tensor, codebooks: torch.Tensor, chunk_elements: int = 1 << 22):
    """points [B, N, d], codebooks [B, K, d] -> indices [B, N] int64, squared distances [B, N]."""
    batch, n, _ = points.shape
    codebook_sq = codebooks.pow(2).sum(2).unsqueeze(1)  # [B, 1, K]
    chunk = max(1, chunk_elements // (codebooks.shape[1] * batch))
    indices = torch.empty(batch, n, dtype=torch.int64, device=points.device)
    distances = torch.empty(batch, n, dtype=points.dtype, device=points.device)
    for begin in range(0, n, chunk):
        block = points[:, begin:begin + chunk]
        scores = torch.baddbmm(codebook_sq, block, codebooks.transpose(1, 2), beta=1.0, alpha=-2.0)
        best, indices[:, begin:begin + chunk] = scores.min(2)
        distances[:, begin:begin + chunk] = (best + block.pow(2).sum(2)).clamp_min_(0)
    return indices, distances


def kmeans_batched(points: torch.Tensor, k: int, iters: int, seed: int):
    """points [B, N, d] float32 -> (codebooks [B, k, d], indices [B, N], objective [B] list per step, iterations)."""
    batch = points.shape[0]
    codebooks = kmeans_pp_batched(points, k, seed)
    indices, distances = assign_batched(points, codebooks)
    objective, done = [distances.double().sum(1).tolist()], 0
    offsets = (torch.arange(batch, device=points.device) * k).unsqueeze(1)
    for step in range(iters):
        sums, counts = cluster_sums(points.reshape(-1, points.shape[2]), (indices + offsets).reshape(-1), batch * k)
        centres = (sums / counts.clamp_min(1).unsqueeze(1)).to(points.dtype).reshape(batch, k, -1)
        empty = counts.reshape(batch, k) == 0
        for b in empty.any(1).nonzero().flatten().tolist():  # rare: re-seed on the worst-served points
            slots = empty[b].nonzero().flatten()
            worst = torch.topk(distances[b], min(slots.numel(), points.shape[1])).indices.sort().values
            centres[b, slots[: worst.numel()]] = points[b, worst]
        codebooks = centres
        new_indices, distances = assign_batched(points, codebooks)
        objective.append(distances.double().sum(1).tolist())
        done = step + 1
        converged = torch.equal(new_indices, indices)
        indices = new_indices
        if converged:
            break
    return codebooks, indices, objective, done
