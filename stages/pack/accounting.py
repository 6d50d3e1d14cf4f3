"""Storage and effective bits per weight, METHOD.md §5 (the paper's Appendix A.5).

Per layer and projection, `n` experts of `oc x ic`, shared rank `k`, `b` bits, vector length `d`:
    bits = 16 k (ic + n oc)            shared basis + expert coefficients (16-bit)
         + n oc ic b                   indices (b*d bits per d weights)
         + n 2^(b d) d 16              codebooks (16-bit)
         + n 2 oc 16                   BCOS scale and shift (16-bit; absent without BCOS)
over `n oc ic` weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectionBits:
    shared: int
    indices: int
    codebooks: int
    corrections: int
    weights: int

    @property
    def total(self) -> int:
        return self.shared + self.indices + self.codebooks + self.corrections

    @property
    def bits_per_weight(self) -> float:
        return self.total / self.weights


def projection_bits(n: int, oc: int, ic: int, rank: int, bits: int, dim: int,
                    corrected: bool = True, with_basis: bool = True, side: str = "input") -> ProjectionBits:
    """`with_basis=False` for matrices whose coefficients use another group's basis (a shared expert
    of another size stacked with the routed experts): only their `16 k n oc` coefficient bits count.
    `side="output"` for a part shared on its output side (`klt-svd --down output`): its basis is
    `k x oc` and its coefficients `k x ic`, so the shared term is `16 k (oc + n ic)`."""
    basis_width, coeff_width = (ic, oc) if side == "input" else (oc, ic)
    return ProjectionBits(
        shared=16 * rank * ((basis_width if with_basis else 0) + n * coeff_width),
        indices=n * oc * ic * bits,
        codebooks=n * (2 ** (bits * dim)) * dim * 16,
        corrections=n * 2 * oc * 16 if corrected else 0,
        weights=n * oc * ic,
    )
