"""VQ matmul of one Qwen1.5-MoE-A2.7B expert on each kernels backend, beside dense fp32 and bf16 `x @ W.T`.

Shapes gate/up (1408 x 2048) and down (2048 x 1408), 2 bits with d=4 (8-bit codes, K=256, fp16 codebook),
for decode (T=1, T=8 rows) and prefill (T=512). Repetitions are interleaved (every backend once, in a
shuffled order, then again) and the median is kept, so a machine shared with others slows all columns
alike; the printed ratios are to dense fp32 measured in the same run. Each repetition uses the next of
`--experts` distinct experts, so weights are not all cache-resident (as in a MoE, where every step routes to
other experts).
At decode sizes `cpu lut` / `triton gather` time the backend's other decode kernel beside its default.

    OMP_NUM_THREADS=2 python benchmarks/bench_kernels.py [--experts 8] [--reps 15] [--backends torch,cpu]
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time

import torch

from kbvq_cli.kernels import vq_matmul
from kbvq_cli.kernels.reference import dequantize

SHAPES = {"gate/up": (1408, 2048), "down": (2048, 1408)}
TOKENS = (1, 8, 512)
BITS, D = 8, 4


def default_backends(device: torch.device) -> list[str]:
    from kbvq_cli.kernels import cpu_backend

    if device.type == "cuda":
        return ["reference", "torch", "triton"]
    return ["reference", "torch"] + (["cpu"] if cpu_backend.available() else [])


def make_experts(oc: int, ic: int, count: int, device: torch.device, gen: torch.Generator):
    """`count` experts: codes uint8 [oc, ic/d], codebook fp16 [K, d], and their dense fp32 and bf16 matrices."""
    experts = []
    for _ in range(count):
        indices = torch.randint(0, 1 << BITS, (oc, ic // D), generator=gen, dtype=torch.uint8)
        codebook = (torch.randn(1 << BITS, D, generator=gen) * 0.02).half()
        weight = dequantize(indices, codebook).float()
        experts.append({"indices": indices.to(device), "codebook": codebook.to(device),
                        "fp32": weight.to(device), "bf16": weight.bfloat16().to(device)})
    return experts


# The other decode kernel of a backend, for an A/B beside its default: name, module, function, lut, and
# the most rows it differs for (the cpu table is only ever used for single tokens).
DECODE_VARIANTS = {"cpu": ("cpu lut", "kbvq_cli.kernels.cpu_backend", "decode_segments", True, 1),
                   "triton": ("triton gather", "kbvq_cli.kernels.triton_backend", "decode_rows", False, 8)}


def decode_variant(backend: str, x: torch.Tensor):
    """(name, function(expert)) running `backend`'s non-default decode kernel on all rows of x."""
    name, module, function, lut, _ = DECODE_VARIANTS[backend]
    decode = getattr(importlib.import_module(module), function)

    def run(e):
        out = torch.zeros(x.shape[0], e["indices"].shape[0], device=x.device)
        decode(x.contiguous(), [(0, 0, x.shape[0])], e["indices"][None], e["codebook"][None], out, lut=lut)
        return out

    return name, run


def candidates(experts, backends: list[str], x: torch.Tensor):
    """name -> function(expert) running one matmul of `x` [T, ic]."""
    x_bf16 = x.bfloat16()
    runs = {"dense fp32": lambda e: x @ e["fp32"].T, "dense bf16": lambda e: x_bf16 @ e["bf16"].T}
    for name in backends:
        runs[name] = lambda e, name=name: vq_matmul(x, e["indices"], e["codebook"], backend=name)
        if name in DECODE_VARIANTS and x.shape[0] <= DECODE_VARIANTS[name][4]:
            variant, run = decode_variant(name, x)
            runs[variant] = run
    return runs


def median_times(runs, experts, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each run, interleaved in shuffled order, each repetition on the next expert."""
    for run in runs.values():  # warm-up: first-call costs (builds, allocations) stay out of the figures
        run(experts[0])
    times = {name: [] for name in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for rep in range(reps):
        expert = experts[rep % len(experts)]
        shuffle(order)  # so that no run always finds the cache its predecessor left
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            runs[name](expert)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def check(runs, expert, x: torch.Tensor) -> None:
    """Every backend agrees with the dense fp32 product before it is timed."""
    expected = x.double() @ expert["fp32"].double().T
    for name, run in runs.items():
        if name.startswith("dense"):
            continue
        error = (run(expert).double() - expected).abs().max() / expected.abs().max()
        assert error < 1e-3, f"{name} is off by {error:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="distinct experts cycled through")
    parser.add_argument("--reps", type=int, default=15, help="repetitions for decode (prefill uses a third)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: all that run here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    gen = torch.Generator().manual_seed(0)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.experts} experts cycled, "
          f"median of interleaved repetitions; ratio = time / dense fp32 time (lower is faster)")
    for shape_name, (oc, ic) in SHAPES.items():
        experts = make_experts(oc, ic, args.experts, device, gen)
        for tokens in TOKENS:
            x = (torch.randn(tokens, ic, generator=gen)).to(device)
            runs = candidates(experts, backends, x)
            check(runs, experts[0], x)
            reps = args.reps if tokens < 64 else max(3, args.reps // 3)
            medians = median_times(runs, experts, reps, device)
            base = medians["dense fp32"]
            cells = "  ".join(f"{name} {seconds * 1e3:7.3f} ms ({seconds / base:5.2f}x)"
                              for name, seconds in medians.items())
            print(f"{shape_name:8s} {oc}x{ic} T={tokens:<4d} {cells}", flush=True)


if __name__ == "__main__":
    main()
