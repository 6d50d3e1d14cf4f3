"""Settings of `kbvq vq` (docs/method.md §3); defaults are the paper's (2 bits, d = 4, 100 iterations, seed 42)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.bit_limits import vq_problem
from kbvq_cli.settings import require

# The least-squares refinement solves for every codebook entry at once: (K d)^2 float64 numbers.
MAX_REFINE_UNKNOWNS = 4096

@dataclass(frozen=True)
class VqSettings:
    bits: int = 2
    dim: int = 4
    iters: int = 100
    # auto: k-means on the GPU (torch, experts batched) when the device is CUDA, faiss on the CPU. The
    # manifest records the backend that ran, so a CPU run made before `auto` existed stays valid.
    backend: Literal["auto", "faiss", "torch"] = "auto"
    seed: int = 42
    device: str = "auto"  # torch backend only
    # torch backend: routed experts of a layer quantized together (one batched kernel per step instead of
    # one per expert: for GPUs). Batched and one-by-one runs gave identical codes on CPU tests, but float
    # rounding of a batched matmul may differ, so it is part of the hashed settings.
    expert_batch: int = 8
    # GPTQ-style error feedback (the GPTVQ baseline, Table 5): with the k-means codebook fixed, assign the
    # sub-vectors column group by column group, spreading each group's output error over the columns
    # not yet assigned through the inverse of the expert's input second moment (damped by `damp`).
    error_feedback: bool = False
    damp: float = 0.01
    # Output-aware VQ (stages/vq/output_aware.py, docs/method.md §3), off by default (the paper's k-means
    # fits the weights). `output`: after the k-means, up to `iters` Lloyd iterations weighted by the
    # diagonal d x d blocks of the expert's input second moment C. `refine_iters`: rounds of a closed-form
    # least-squares codebook under the full C, each followed by a re-assignment (error feedback's when
    # `error_feedback` is on).
    objective: Literal["weight", "output"] = "weight"
    refine_iters: int = 0

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        problem = vq_problem(self.bits, self.dim)
        require(problem is None, f"{where}.{problem}")
        require(self.iters >= 1, f"{where}.iters must be at least 1 (got {self.iters}): the codebook is what "
                                 f"the Lloyd iterations fit")
        require(self.expert_batch >= 1, f"{where}.expert_batch must be >= 1")
        require(0 <= self.damp < 1, f"{where}.damp must be in [0, 1)")
        require(self.refine_iters >= 0, f"{where}.refine_iters must be >= 0")
        unknowns = 2 ** (self.bits * self.dim) * self.dim
        require(not self.refine_iters or unknowns <= MAX_REFINE_UNKNOWNS,
                f"{where}.refine_iters needs at most {MAX_REFINE_UNKNOWNS} codebook entries (2^(bits*dim) * dim; "
                f"here {unknowns}): use bits 2 with dim 4, or dim 2")
