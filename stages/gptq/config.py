"""Settings of `kbvq gptq`: the RTN and GPTQ baselines of the paper's Table 1.

Defaults are the paper's GPTQ row, "2.25 bits": 2-bit codes in groups of 128 input columns, each group
with a 16-bit scale and a 16-bit zero point (2 + 32/128 bits per weight); damping 1% of the mean of the
Hessian's diagonal, as GPTQ (Frantar et al. 2022) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.bit_limits import scalar_problem
from kbvq_cli.settings import require



@dataclass(frozen=True)
class GptqSettings:
    method: Literal["rtn", "gptq"] = "gptq"
    bits: int = 2
    group_size: int = 128  # input columns per scale/zero; 0 = one group per output channel (per-channel)
    damp: float = 0.01  # lambda: lambda * mean(diag H) is added to H's diagonal (gptq only)
    act_order: bool = False  # gptq only: quantize columns by descending diag(H)
    block_size: int = 128  # gptq only: columns per lazy-batch block (changes float rounding, so hashed)
    symmetric: bool = False  # default asymmetric: min/max grid with a zero point per group
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (not hashed: where it runs, not what it computes)

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        problem = scalar_problem(self.bits)
        require(problem is None, f"{where}.{problem}")
        require(self.group_size >= 0, f"{where}.group_size must be >= 0 (0 = per output channel); "
                                      f"got {self.group_size}")
        require(0 <= self.damp < 1, f"{where}.damp must be in [0, 1) (a fraction of mean(diag H)); got {self.damp}")
        require(self.block_size >= 1, f"{where}.block_size must be >= 1; got {self.block_size}")
        require(not (self.act_order and self.method == "rtn"),
                f"{where}.act_order applies to method gptq only; drop --act-order or use --method gptq")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                f"{where}.device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
