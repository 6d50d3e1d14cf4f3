"""Settings of `kbvq vq` (METHOD.md §3); defaults are the paper's (2 bits, d = 4, 100 iterations, seed 42)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.settings import require

# dim -> the bits it supports, with K = 2^(bits * dim) codewords per matrix. 4 bits at d = 4 would be
# K = 65536: that codebook (65536 x 4 x 16 bits) alone costs 1.5 bits per weight of a 1408 x 2048 expert,
# and k-means over that many centroids is slow; at d = 2, 4 bits is K = 256.
ALLOWED_BITS = {4: (2, 3), 2: (2, 3, 4)}


def combinations() -> str:
    """The valid (bits, dim) pairs in words, with their codebook sizes, for error messages."""
    def words(values):
        return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])
    pairs = [f"bits {words(bits)} with dim {dim} ({words([2 ** (b * dim) for b in bits])} codewords)"
             for dim, bits in ALLOWED_BITS.items()]
    return " and ".join(pairs) + ", as K = 2^(bits*dim)"


@dataclass(frozen=True)
class VqSettings:
    bits: int = 2
    dim: int = 4
    iters: int = 100
    backend: Literal["faiss", "torch"] = "faiss"
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
        require(self.dim in ALLOWED_BITS, f"{where}.dim={self.dim} is not supported; valid: {combinations()}")
        other_dims = [dim for dim, bits in ALLOWED_BITS.items() if self.bits in bits]
        hint = f"; for {self.bits} bits pass --dim {other_dims[0]}" if other_dims else ""
        require(self.bits in ALLOWED_BITS[self.dim],
                f"{where}.bits={self.bits} is out of range for dim {self.dim}; valid: {combinations()}{hint}")
        require(self.iters >= 1, f"{where}.iters must be at least 1 (got {self.iters}): the codebook is what "
                                 f"the Lloyd iterations fit")
        require(self.expert_batch >= 1, f"{where}.expert_batch must be >= 1")
        require(0 <= self.damp < 1, f"{where}.damp must be in [0, 1)")
