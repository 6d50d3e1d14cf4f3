"""Settings of `kbvq klt-svd` (IDRE, docs/method.md §2); defaults are the paper's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.settings import require

PAPER_RANK_RATIO = 1 / 128


@dataclass(frozen=True)
class KltSvdSettings:
    # At most one of these three; none given means rank_ratio = 1/128 of min(oc, ic) (paper, Table 4/7).
    rank_ratio: float | None = None
    rank: int | None = None  # 0 = no shared part: the later stages then give plain VQ
    energy: float | None = None  # smallest rank whose rho_k reaches this fraction
    # Ranks per layer and projection chosen for at most this many bits per expert weight in all
    # (stages/klt_svd/budget.py), at the code size of the run's vq and bcos settings.
    target_bits: float | None = None
    klt: bool = True  # False: the "SVD without KLT" ablation (T = I)
    damp: float = 0.01  # lambda in C + lambda * mean(diag C) * I
    down: Literal["pooled", "output", "off"] = "pooled"
    include_shared_experts: bool = True  # stack shared experts' gate/up with the routed ones
    device: str = "auto"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        given = [name for name in ("rank_ratio", "rank", "energy", "target_bits") if getattr(self, name) is not None]
        require(len(given) <= 1, f"{where}: give only one of rank_ratio, rank, energy, target_bits "
                                 f"(got {', '.join(given)})")
        require(self.target_bits is None or self.target_bits > 0, f"{where}.target_bits must be > 0")
        require(self.rank_ratio is None or 0 < self.rank_ratio <= 1, f"{where}.rank_ratio must be in (0, 1]")
        require(self.rank is None or self.rank >= 0, f"{where}.rank must be >= 0")
        require(self.energy is None or 0 < self.energy <= 1, f"{where}.energy must be in (0, 1]")
        require(self.damp >= 0, f"{where}.damp must be >= 0")
