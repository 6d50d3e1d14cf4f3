"""Candidates for the compiled CPU decode GEMV, at Qwen1.5-MoE expert shapes, beside dense fp32 and bf16.

8-bit codes (K=256, d=4), T=1 and T=8 rows, shapes 1408x2048 and 2048x1408. Each candidate is timed with
interleaved repetitions in shuffled order (median) cycling over `--experts` distinct experts, as ratios to
dense fp32 of the same run; its first-call cost (compile, or load from a cold cache) is printed first:
  numba lut / numba gather   @njit(parallel=True, cache=True) kernels: LUT GEMV, codebook-row gather
  inductor lut / gather      torch.compile of the pure-torch LUT and of the codebook-row gather
  load_inline                cpu_kernels.cpp built by torch.utils.cpp_extension.load_inline (~1 minute)
  cpu (chosen) / cpu lut     the same file as a plain shared library through ctypes (the `cpu` backend)
  torch lut                  the `torch` backend's LUT, eager
Needs numba (pip install numba) for its rows; the rest needs torch and a C++ compiler.

    OMP_NUM_THREADS=2 python benchmarks/bench_kernel_candidates.py [--skip load_inline,inductor]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from kbvq_cli.kernels import cpu_backend, torch_backend
from kbvq_cli.kernels.reference import dequantize

SHAPES = ((1408, 2048), (2048, 1408))
TOKENS = (1, 8)
NUM_CODES, D = 256, 4

WRAPPER = r"""
torch::Tensor inline_decode(torch::Tensor x, torch::Tensor indices, torch::Tensor codebook) {
  auto out = torch::empty({x.size(0), indices.size(0)}, x.options());
  int64_t bounds[2] = {0, x.size(0)}, expert = 0;
  kbvq_decode(x.data_ptr<float>(), bounds, 1, indices.data_ptr(), 1, &expert, codebook.data_ptr<float>(),
              indices.size(0), x.size(1), codebook.size(0), codebook.size(1), 0, at::get_num_threads(),
              out.data_ptr<float>());
  return out;
}
"""


def numba_kernels():
    """The numba candidates, compiled into a throw-away cache so that the first call shows the compile."""
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="kbvq-numba-")
    import numba
    import numpy as np
    from numba import njit, prange

    numba.set_num_threads(torch.get_num_threads())

    @njit(parallel=True, cache=True, fastmath=True)
    def lut_gemv(x, indices, codebook_t, out):  # x [T, ic], indices [oc, J] uint8, codebook_t [d, K]
        rows, ic = x.shape
        oc, groups = indices.shape
        d, num_codes = codebook_t.shape
        for t in range(rows):
            lut = np.zeros((groups, num_codes), np.float32)
            for j in prange(groups):
                for i in range(d):
                    for c in range(num_codes):
                        lut[j, c] += x[t, j * d + i] * codebook_t[i, c]
            for o in prange(oc):
                acc = np.float32(0.0)
                for j in range(groups):
                    acc += lut[j, indices[o, j]]
                out[t, o] = acc

    @njit(parallel=True, cache=True, fastmath=True)
    def gather(x, indices, codebook, out):  # codebook [K, d]
        rows, ic = x.shape
        oc, groups = indices.shape
        d = codebook.shape[1]
        for o in prange(oc):
            for t in range(rows):
                acc = np.float32(0.0)
                for j in range(groups):
                    c = indices[o, j]
                    for i in range(d):
                        acc += codebook[c, i] * x[t, j * d + i]
                out[t, o] = acc

    def run(kernel, transpose):
        def call(x, indices, codebook):
            out = np.empty((x.shape[0], indices.shape[0]), np.float32)
            book = codebook.T.contiguous() if transpose else codebook
            kernel(x.numpy(), indices.numpy(), book.numpy(), out)
            return torch.from_numpy(out)
        return call

    return {"numba lut": run(lut_gemv, True), "numba gather": run(gather, False)}


def inductor_kernels():
    def lut(x, indices, codebook):
        return torch_backend.lut_matmul(x, indices, codebook)

    def gather(x, indices, codebook):  # the codebook rows of each code, times x's groups, summed
        rows, (oc, groups) = x.shape[0], indices.shape
        weight = codebook[indices.long()]                                   # [oc, J, d]
        return (weight[None] * x.reshape(rows, 1, groups, D)).sum((-1, -2))  # [T, oc]

    return {"inductor lut": torch.compile(lut, dynamic=False), "inductor gather": torch.compile(gather, dynamic=False)}


def load_inline_kernel():
    from torch.utils.cpp_extension import load_inline

    source = cpu_backend.SOURCE.read_text() + WRAPPER
    module = load_inline("kbvq_candidate", cpp_sources=source, functions=["inline_decode"],
                         extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                         build_directory=tempfile.mkdtemp(prefix="kbvq-inline-"))
    return {"load_inline": module.inline_decode}


def chosen_kernels():
    def run(lut):
        def call(x, indices, codebook):
            out = torch.empty(x.shape[0], indices.shape[0])
            cpu_backend.decode_segments(x, [(0, 0, x.shape[0])], indices[None], codebook[None], out, lut=lut)
            return out
        return call

    os.environ["KBVQ_CACHE"] = tempfile.mkdtemp(prefix="kbvq-cache-")  # a cold cache: the build is timed
    cpu_backend.library()
    return {"cpu (chosen)": run(False), "cpu lut": run(True)}


def dense_kernels(weights):
    return {"dense fp32": lambda x, e: x @ weights[e][0].T, "dense bf16": lambda x, e: x.bfloat16() @ weights[e][1].T}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--skip", default="", help="comma-separated: numba, inductor, load_inline")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    builders = {"chosen": chosen_kernels, "numba": numba_kernels, "inductor": inductor_kernels,
                "load_inline": load_inline_kernel}
    candidates = {}
    print(f"torch threads {torch.get_num_threads()}; first call = build or compile from a cold cache")
    for name, build in builders.items():
        if name in skip:
            continue
        started = time.perf_counter()
        candidates.update(build())
        print(f"  {name:12s} built in {time.perf_counter() - started:6.1f} s", flush=True)
    candidates["torch lut"] = torch_backend.lut_matmul
    gen = torch.Generator().manual_seed(0)
    for oc, ic in SHAPES:
        experts = [(torch.randint(0, NUM_CODES, (oc, ic // D), generator=gen, dtype=torch.uint8),
                    torch.randn(NUM_CODES, D, generator=gen).half().float()) for _ in range(args.experts)]
        weights = [(dequantize(i, c), dequantize(i, c).bfloat16()) for i, c in experts]
        for tokens in TOKENS:
            x = torch.randn(tokens, ic, generator=gen)
            print(f"{oc}x{ic} T={tokens}: " + time_all(candidates, dense_kernels(weights), experts, x, args.reps),
                  flush=True)


def time_all(candidates, dense, experts, x, reps: int) -> str:
    """Interleaved medians, each checked against dense fp32 first; first calls (per-shape compiles) excluded."""
    runs = {name: (lambda e, run=run: run(x, e)) for name, run in dense.items()}
    runs.update({name: (lambda e, run=run: run(x, *experts[e])) for name, run in candidates.items()})
    expected = runs["dense fp32"](0).double()
    first = {}
    for name, run in runs.items():
        started = time.perf_counter()
        error = ((run(0).double() - expected).abs().max() / expected.abs().max()).item()
        first[name] = time.perf_counter() - started
        assert name in dense or error < 1e-3, f"{name} is off by {error:.2e}"  # (bf16 dense is not exact)
    times = {name: [] for name in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for rep in range(reps):
        shuffle(order)  # so that no candidate always runs in the cache its predecessor left
        for name in order:
            started = time.perf_counter()
            runs[name](rep % len(experts))
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["dense fp32"])
    cells = []
    for name, values in times.items():
        seconds = statistics.median(values)
        note = f", first {first[name]:.1f} s" if first[name] > 0.5 else ""
        cells.append(f"{name} {seconds * 1e3:.2f} ms ({seconds / base:.2f}x{note})")
    return "  ".join(cells)


if __name__ == "__main__":
    main()
