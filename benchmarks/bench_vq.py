"""Benchmark `vq` on one Qwen1.5-MoE expert matrix (1408 x 2048), d = 4, at 2 and 3 bits.

Side by side, on the same sub-vectors and iteration count: our faiss backend, our torch backend, and
`faiss.Kmeans` called directly (all points used for training, like ours). Times include
initialisation (ours: k-means++; faiss.Kmeans: random). Ours stops early once the assignment no
longer changes (every later Lloyd iteration would be a no-op); `iters run` shows how many it ran.

    python benchmarks/bench_vq.py [--iters 100] [--bits 2 3] [--skip-torch]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def heavy_tailed_weight(rows: int, cols: int, seed: int):
    """A stand-in for trained expert weights: Student-t entries, per-row scales, std about 0.02."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(seed)
    weight = t.sample((rows, cols)) * 0.014
    return weight * (0.5 + torch.rand(rows, 1, generator=generator))


def run_faiss_kmeans(points, k: int, iters: int, seed: int):
    import faiss
    import numpy as np

    data = np.ascontiguousarray(points.numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=data.shape[0],
                          verbose=False)
    started = time.time()
    kmeans.train(data)
    distances, _ = kmeans.index.search(data, 1)
    return time.time() - started, float(distances.astype(np.float64).sum()), iters


def run_ours(weight, bits: int, iters: int, backend: str, seed: int):
    from stages.vq.backends import make_backend
    from stages.vq.core import vq_quantize

    started = time.time()
    result = vq_quantize(weight, bits, 4, iters, seed, make_backend(backend))
    return time.time() - started, result.objective[-1], result.iterations


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-torch", action="store_true", help="skip our torch backend (slow on CPU)")
    args = parser.parse_args()
    weight = heavy_tailed_weight(1408, 2048, 0)
    points = weight.reshape(-1, 4).contiguous()
    print(f"matrix 1408 x 2048, d=4, {points.shape[0]} sub-vectors, {args.iters} iterations, "
          f"{torch.get_num_threads()} threads, device cpu")
    print(f"{'bits':>4} {'method':<18} {'seconds':>8} {'iters run':>9} {'objective (SSE)':>16}")
    for bits in args.bits:
        k = 2 ** (bits * 4)
        rows = [("faiss.Kmeans", *run_faiss_kmeans(points, k, args.iters, args.seed)),
                ("kbvq faiss", *run_ours(weight, bits, args.iters, "faiss", args.seed))]
        if not args.skip_torch:
            rows.append(("kbvq torch", *run_ours(weight, bits, args.iters, "torch", args.seed)))
        for name, seconds, objective, iters in rows:
            print(f"{bits:>4} {name:<18} {seconds:>8.2f} {iters:>9} {objective:>16.6f}")


if __name__ == "__main__":
    main()
