"""Settings of `kbvq klt-svd` (IDRE, docs/method.md §2); defaults are the paper's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.bit_limits import vq_problem
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
    # With target_bits: VQ code sizes ("BITSxDIM", e.g. "3x2") the budget may give a (layer, projection)
    # besides vq's own; `rank: 0` with them holds every rank at 0 (BCOS-only at the budget's bits).
    code_sizes: tuple[str, ...] | None = None
    klt: bool = True  # False: the "SVD without KLT" ablation (T = I)
    damp: float = 0.01  # lambda in C + lambda * mean(diag C) * I
    down: Literal["pooled", "output", "off"] = "pooled"
    include_shared_experts: bool = True  # stack shared experts' gate/up with the routed ones
    device: str = "auto"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        given = [name for name in ("rank_ratio", "rank", "energy", "target_bits") if getattr(self, name) is not None]
        if self.rank == 0 and self.target_bits is not None:  # ranks held at 0: the budget chooses code sizes only
            require(bool(self.code_sizes), f"{where}: rank 0 with target_bits leaves the budget nothing to choose; "
                                           f"add code_sizes (e.g. [\"2x2\", \"3x2\"]) or drop rank")
            given.remove("rank")
        require(self.code_sizes is None or self.target_bits is not None,
                f"{where}.code_sizes goes with target_bits (the budget chooses among them)")
        for text in self.code_sizes or ():
            require(code_size_problem(text) is None, f"{where}.code_sizes: {code_size_problem(text)}")
        require(len(given) <= 1, f"{where}: give only one of rank_ratio, rank, energy, target_bits "
                                 f"(got {', '.join(given)})")
        require(self.target_bits is None or self.target_bits > 0, f"{where}.target_bits must be > 0")
        require(self.rank_ratio is None or 0 < self.rank_ratio <= 1, f"{where}.rank_ratio must be in (0, 1]")
        require(self.rank is None or self.rank >= 0, f"{where}.rank must be >= 0")
        require(self.energy is None or 0 < self.energy <= 1, f"{where}.energy must be in (0, 1]")
        require(self.damp >= 0, f"{where}.damp must be >= 0")


def parse_code_size(text: str) -> tuple[int, int]:
    """"2x4" -> (bits 2, vector length 4); ValueError if it is not BITSxDIM."""
    bits, separator, dim = str(text).strip().lower().partition("x")
    if not separator or not bits.isdigit() or not dim.isdigit():
        raise ValueError(text)
    return int(bits), int(dim)


def code_size_problem(text: str) -> str | None:
    """Why a `code_sizes` entry is refused, in one line; None if vq supports it."""
    try:
        bits, dim = parse_code_size(text)
    except ValueError:
        return f"{text!r} is not BITSxDIM (e.g. \"3x2\": 3 bits per weight in vectors of 2)"
    problem = vq_problem(bits, dim)
    return None if problem is None else f"{text!r}: {problem}"
