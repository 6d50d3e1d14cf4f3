"""Settings of `kbvq vq` (docs/method.md §3); defaults are the paper's (2 bits, d = 4, 100 iterations, seed 42)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.bit_limits import vq_problem
from kbvq_cli.settings import require

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

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        problem = vq_problem(self.bits, self.dim)
        require(problem is None, f"{where}.{problem}")
        require(self.iters >= 1, f"{where}.iters must be at least 1 (got {self.iters}): the codebook is what "
                                 f"the Lloyd iterations fit")
        require(self.expert_batch >= 1, f"{where}.expert_batch must be >= 1")
        require(0 <= self.damp < 1, f"{where}.damp must be in [0, 1)")
