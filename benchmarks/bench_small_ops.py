"""What a small torch op costs at decode sizes, by thread count and OpenMP wait policy (docs/kernels.md,
"Decode: whole projections in one call"). Each setting runs in a child process of its own, because
libgomp reads OMP_WAIT_POLICY once, at start.

    python benchmarks/bench_small_ops.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

SETTINGS = [("1", "PASSIVE"), ("2", "PASSIVE"), ("2", "ACTIVE")]


def per_call_us(function, calls: int = 200) -> float:
    for _ in range(10):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


def measure() -> str:
    """One line of microseconds per call for the ops the general decode path used most."""
    out, token, rows = torch.zeros(1, 2048), torch.zeros(4, dtype=torch.long), torch.randn(4, 2048)
    hidden = torch.randn(1, 2048)
    codebooks, experts = torch.randn(60, 256, 4, dtype=torch.bfloat16), torch.tensor([0, 5, 9, 33])
    ops = {"index_add_ 4 rows": lambda: out.index_add_(0, token, rows), "gather 4 rows": lambda: hidden[token],
           "gather 4 codebooks": lambda: codebooks[experts], "sum of 4 rows": lambda: rows.sum(0)}
    return " | ".join(f"{per_call_us(op):.0f}" for op in ops.values()), " | ".join(ops)


if __name__ == "__main__":
    if os.environ.get("KBVQ_SMALL_OPS_CHILD"):
        print(measure()[0])
        sys.exit()
    print(f"| threads | OMP_WAIT_POLICY | {measure()[1]} (us per call) |")
    print("|---|---|" + "---|" * 4)
    for threads, policy in SETTINGS:
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": policy, "KBVQ_SMALL_OPS_CHILD": "1"}
        line = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=True).stdout
        print(f"| {threads} | {policy} | {line.strip()} |")
