"""Settings of `kbvq nonexpert`: whether and how the layers outside the experts are quantized.

The default, `method: none`, keeps attention, dense MLPs and everything else as in the checkpoint,
as the paper's storage accounting does (it quantizes the experts; see the README). `rtn` or `gptq`
quantize the `nn.Linear`s under the listed module prefixes with the baselines' scalar quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.bit_limits import scalar_problem
from kbvq_cli.settings import require


@dataclass(frozen=True)
class NonExpertSettings:
    method: Literal["none", "rtn", "gptq"] = "none"
    # Module path prefixes inside a decoder layer whose nn.Linear layers are quantized: attention by
    # default; add "mlp" for the dense MLP layers of models that have some (DeepSeek-V2's first layer).
    # Routers, shared-expert gates and the experts themselves are never touched here.
    modules: tuple[str, ...] = ("self_attn",)
    bits: int = 4
    group_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    device: str = "auto"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        problem = scalar_problem(self.bits)
        require(problem is None, f"{where}.{problem}")
        require(self.group_size >= 0, f"{where}.group_size must be >= 0 (0 = per output channel)")
        require(0 <= self.damp < 1, f"{where}.damp must be in [0, 1)")
        require(not (self.act_order and self.method != "gptq"), f"{where}.act_order applies to method gptq only")
