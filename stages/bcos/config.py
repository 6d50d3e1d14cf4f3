"""Settings of `kbvq bcos` (docs/method.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.settings import require


@dataclass(frozen=True)
class BcosSettings:
    mode: Literal["full", "mean", "var", "none"] = "full"  # none: identity corrections (no-BCOS ablations)
    propagate: bool = False  # take the quantized model's own inputs from a data pass, layer by layer
    min_tokens: int = 16  # experts routed fewer tokens keep the identity correction, and are reported
    min_std_ratio: float = 1e-6  # sigma(yh_j) below this fraction of the channel mean sigma -> s_j = 0
    device: str = "auto"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        require(self.min_tokens >= 0, f"{where}.min_tokens must be >= 0")
        require(self.min_std_ratio >= 0, f"{where}.min_std_ratio must be >= 0")
