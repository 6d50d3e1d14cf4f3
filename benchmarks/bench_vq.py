"""Benchmark `vq` on one Qwen1.5-MoE expert matrix (1408 x 2048), d = 4, at 2 and 3 bits.

Side by side, on the same sub-vectors and iteration count: our faiss backend, our torch backend, and
`faiss.Kmeans` called directly (all points used for training, like ours). Times include
initialisation (ours: k-means++; faiss.Kmeans: random). Ours stops early once the assignment no
longer changes (every later Lloyd iteration would be a no-op); `iters run` shows how many it ran.

    python benchmarks/bench_vq.py [--iters 100] [--bits 2 3] [--skip-torch]

`--expert` times instead one whole Qwen1.5-MoE-shaped expert (gate and up 1408 x 2048, down 2048 x 1408)
through the vq stage's own per-expert function (`quantize_group`: k-means++, Lloyd on the faiss
backend, the 16-bit codebook, the weight and output errors from compact calibration moments), beside
`faiss.Kmeans` alone on the same three matrices at the same iterations; best of `--repeats`, the two
interleaved, and their ratio (the target is at most 1.3):

    python benchmarks/bench_vq.py --expert [--iters 10] [--repeats 3]
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


def expert_inputs(hidden: int, inter: int, weights, tokens: int = 4096):
    """A compact-layout calibration layer for one expert (real schema, `stored_sums`) and its weights."""
    import torch

    from kbvq_cli.experts import LayerExperts
    from stages.calibrate.reader import CalibLayerMeta, CalibrationLayer, stored_sums
    from stages.klt_svd.reader import KltLayerMeta, SharedParts

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for prefix, dim in (("experts.gate_up", hidden), ("experts.down", inter)):
        x = torch.randn(tokens, dim, generator=generator) * torch.rand(dim, generator=generator)
        tensors.update(stored_sums(prefix, x.sum(0)[None], (x.T @ x)[None], torch.tensor([tokens]), torch.float32,
                                   "compact"))
    stats = CalibrationLayer(0, tensors, CalibLayerMeta(0, True, {}, "compact"))
    experts = LayerExperts({name: w[None] for name, w in weights.items()}, {}, None)
    return experts, SharedParts({}, KltLayerMeta(0, {})), stats  # rank 0: vq quantizes the weights themselves


def bench_expert(args) -> None:
    """One Qwen1.5-MoE-shaped expert through the stage's per-expert work against faiss.Kmeans alone."""
    import torch

    from stages.vq.backends import make_backend
    from stages.vq.config import VqSettings
    from stages.vq.stage import quantize_group

    weights = {"gate": heavy_tailed_weight(1408, 2048, 1), "up": heavy_tailed_weight(1408, 2048, 2),
               "down": heavy_tailed_weight(2048, 1408, 3)}
    experts, parts, stats = expert_inputs(2048, 1408, weights)
    bits = args.bits[0]
    settings = VqSettings(bits=bits, iters=args.iters, seed=args.seed, backend="faiss", device="cpu")
    backend = make_backend("faiss")
    points = {name: w.reshape(-1, 4).contiguous() for name, w in weights.items()}
    best = {"faiss.Kmeans x3": float("inf"), "kbvq vq expert": float("inf")}
    for _ in range(args.repeats):
        best["faiss.Kmeans x3"] = min(best["faiss.Kmeans x3"], sum(
            run_faiss_kmeans(p, 2 ** (bits * 4), args.iters, args.seed)[0] for p in points.values()))
        started = time.time()
        quantize_group(experts, parts, stats, 0, [0], settings, backend)
        best["kbvq vq expert"] = min(best["kbvq vq expert"], time.time() - started)
    best["of which output errors"] = metric_seconds(experts, stats, args.repeats)
    print(f"one Qwen1.5-MoE expert (gate, up 1408 x 2048; down 2048 x 1408), {bits} bits, d=4, {args.iters} "
          f"iterations, {torch.get_num_threads()} threads, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:<18} {seconds:8.2f} s")
    print(f"  ratio kbvq / faiss.Kmeans: {best['kbvq vq expert'] / best['faiss.Kmeans x3']:.2f} (target <= 1.3); "
          f"output errors / faiss.Kmeans: {best['of which output errors'] / best['faiss.Kmeans x3']:.3f} "
          f"(at {args.iters} iterations; the errors' cost does not depend on them)")


def metric_seconds(experts, stats, repeats: int) -> float:
    """The stage's output-error work for one expert alone (`vq_output_errors` per projection, with the
    moments read as the stage reads them), best of `repeats`."""
    from kbvq_cli.output_error import vq_output_errors

    best = float("inf")
    for _ in range(repeats):
        started = time.time()
        for projection in ("gate", "up", "down"):
            weight = experts.matrix(projection, 0)
            second = stats.expert_input(projection, 0, None).sum_xxT
            vq_output_errors(weight, weight * 0.9, None, second)
        best = min(best, time.time() - started)
    return best


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=None, help="Lloyd iterations (100; --expert: 10)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-torch", action="store_true", help="skip our torch backend (slow on CPU)")
    parser.add_argument("--expert", action="store_true", help="one whole expert through the stage (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.expert:
        args.iters = args.iters or 10
        return bench_expert(args)
    args.iters = args.iters or 100
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
