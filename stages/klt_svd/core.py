"""IDRE, the KLT-guided SVD of docs/method.md §2, as pure float64 tensor math.

Input-shared decomposition (gate, up, and `down` pooled): with `C = T T^T` the damped input second
moment, every expert is mapped to `What_i = W_i T`; the stack `[What_1; ...; What_n]` is decomposed by
the eigendecomposition of its Gram matrix `sum_i What_i^T What_i` (`ic x ic`, small whatever the number
of experts, and exact in float64 for the leading subspace); with `B_k` its top-k eigenvectors:
`shared_basis = B_k^T T^-1` (`k x ic`), `expert_coeffs_i = W_i T B_k` (`oc_i x k`),
`W_share_i = expert_coeffs_i @ shared_basis`.

A stack with fewer rows than columns (a shared expert's own `down`, `[H, Is]` with `H < Is`) is
decomposed from its row-side Gram instead, `S C S^T` (`rows x rows`): the same shared parts without
any `ic x ic` eigendecomposition, not even the KLT's (`T` never appears: `B_k^T T^-1 = U_k^T S / s_k`,
`S T B_k = U_k s_k`). On Qwen1.5-MoE this replaces two 5632 x 5632 eigendecompositions by one of 2048.

Output-shared decomposition (the `down` option): the experts share their output space instead:
`shared_basis = B_k^T` (`k x oc`) from the Gram matrix `sum_i W_i W_i^T`, `expert_coeffs_i = B_k^T W_i`
(`k x ic_i`), `W_share_i = shared_basis^T @ expert_coeffs_i`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from kbvq_cli.errors import KbvqError

Side = Literal["input", "output"]


class Klt:
    """The damped second moment `damped` = C + damp mean(diag C) I [ic, ic] float64, and its KLT
    `T = V diag(root)` (T T^T = damped; `T^-1 = diag(1/root) V^T`), from one eigendecomposition made on
    first use (a decomposition that needs only `damped` never makes it). Only `V` and `root` are kept,
    and `damped` is dropped once they exist: at Mixtral's 14336-wide down input each such matrix is
    1.6 GB, so `transform` and `inverse` are formed only when asked for (tests)."""

    def __init__(self, damped: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.damped = damped
        self._factors = factors

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V [ic, ic], root [ic]) with T = V diag(root), float64."""
        if self._factors is None:
            eigenvalues, eigenvectors = torch.linalg.eigh(self.damped)
            eigenvalues = eigenvalues.clamp_min(eigenvalues.max() * 1e-12)  # damp 0 on a singular C stays invertible
            self._factors, self.damped = (eigenvectors, eigenvalues.sqrt()), None
        return self._factors

    def second_moment(self) -> torch.Tensor:
        """The damped second moment, [ic, ic] float64 (rebuilt from the factors once they replaced it)."""
        if self.damped is not None:
            return self.damped
        vectors, root = self._factors
        return (vectors * root.square()) @ vectors.T

    @property
    def transform(self) -> torch.Tensor:
        vectors, root = self.factors()
        return vectors * root

    @property
    def inverse(self) -> torch.Tensor:
        vectors, root = self.factors()
        return (vectors / root).T


def damped_klt(second_moment: torch.Tensor, damp: float) -> Klt:
    """KLT of `C + damp * mean(diag C) * I` (docs/method.md §2 steps 1-2). second_moment [ic, ic]."""
    c = second_moment.double()
    c = (c + c.T) / 2  # sums in float32 are symmetric only to rounding
    c.diagonal().add_(damp * c.diagonal().mean().clamp_min(1e-30))
    return Klt(c)


def identity_klt(dim: int, device=None) -> Klt:
    """T = I: the "SVD without KLT" ablation (Tables 3, 14)."""
    return Klt(torch.eye(dim, dtype=torch.float64, device=device),
               (torch.eye(dim, dtype=torch.float64, device=device), torch.ones(dim, dtype=torch.float64, device=device)))


def gram(matrices: list[torch.Tensor], side: Side) -> torch.Tensor:
    """`sum_i W_i^T W_i` (input side, [ic, ic]) or `sum_i W_i W_i^T` (output side), accumulated in float64.

    Each product is taken in the matrices' own dtype: float64 inputs give an exact float64 result,
    float32 ones run at full float32 speed and are summed in float64.
    """
    total = None
    for w in matrices:
        product = (w.T @ w if side == "input" else w @ w.T).double()
        total = product if total is None else total.add_(product)
    return total


@dataclass(frozen=True)
class SharedDecomposition:
    side: Side
    shared_basis: torch.Tensor  # [k, ic] (input side) or [k, oc] (output side), float64
    expert_coeffs: list[torch.Tensor]  # [oc_i, k] (input side) or [k, ic_i] (output side), float64
    singular_values: torch.Tensor  # of the (mapped) stack, descending, float64
    rho: torch.Tensor  # rho[k-1] = energy fraction of the top k singular values (Eq. 17)

    @property
    def rank(self) -> int:
        return int(self.shared_basis.shape[0])


def shared_part(side: Side, shared_basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """`W_share` of one expert, in the dtype of its arguments."""
    return coeffs @ shared_basis if side == "input" else shared_basis.T @ coeffs


def spectrum(gram_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values (descending), rho for every k, and the right singular vectors of a stack, in
    ascending order of their singular values ([d, d]: take the last k, flipped; no flipped copy is made)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(_symmetrized(gram_matrix))
    eigenvalues = eigenvalues.flip(0).clamp_min(0)
    energy = eigenvalues.sum().clamp_min(1e-300)
    return eigenvalues.sqrt(), eigenvalues.cumsum(0) / energy, eigenvectors


def _symmetrized(matrix: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """`(M + M^T) / 2` written into `matrix` itself, tile by tile (no second d x d matrix): the same
    values as the out-of-place expression, entry for entry. Returns `matrix`."""
    dim = matrix.shape[0]
    for row in range(0, dim, tile):
        for col in range(row, dim, tile):
            upper, lower = matrix[row:row + tile, col:col + tile], matrix[col:col + tile, row:row + tile]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)
    return matrix


def _top(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading columns of `spectrum`'s ascending eigenvectors, leading first: [d, k]."""
    return vectors[:, vectors.shape[1] - k:].flip(1)


def select_rank(rho: torch.Tensor, oc: int, ic: int, *, rank_ratio: float | None = None,
                rank: int | None = None, energy: float | None = None) -> int:
    """The rank from at most one of: a ratio of min(oc, ic) (default 1/128, rounded down, at least 1),
    an absolute rank (0 = no shared part), or the smallest k with rho_k >= energy. Capped at len(rho)."""
    given = [name for name, value in (("rank_ratio", rank_ratio), ("rank", rank), ("energy", energy))
             if value is not None]
    if len(given) > 1:
        raise KbvqError(f"give only one of rank_ratio, rank, energy (got {', '.join(given)})")
    if rank is not None:
        if rank < 0:
            raise KbvqError(f"rank must be >= 0 (got {rank})")
        chosen = rank
    elif energy is not None:
        if not 0 < energy <= 1:
            raise KbvqError(f"energy must be in (0, 1] (got {energy})")
        chosen = int(torch.searchsorted(rho, torch.tensor(energy - 1e-12, dtype=rho.dtype, device=rho.device))) + 1
    else:
        ratio = 1 / 128 if rank_ratio is None else rank_ratio
        if not 0 < ratio <= 1:
            raise KbvqError(f"rank_ratio must be in (0, 1] (got {ratio})")
        chosen = max(1, int(min(oc, ic) * ratio + 1e-9))  # 0.29 * 100 is 28.999999999999996 in floating point
    return min(chosen, int(rho.numel()))


RankChooser = Callable[[torch.Tensor], int]


def decompose(weights: list[torch.Tensor], klt: Klt | None, choose_rank: RankChooser, side: Side = "input"
              ) -> SharedDecomposition:
    """Shared basis and per-expert coefficients of `weights` (each [oc_i, ic]; or [oc, ic_i] on the output side).

    `klt` maps the input space (input side only; None or `identity_klt` for plain SVD).
    `choose_rank(rho)` picks k from the energy curve.
    """
    if side == "output":
        singular, rho, vectors = spectrum(gram(weights, "output"))
        basis = _top(vectors, choose_rank(rho))  # [oc, k]
        coeffs = [basis.T @ w.double() for w in weights]
        return SharedDecomposition("output", basis.T.contiguous(), coeffs, singular, rho)
    if sum(w.shape[0] for w in weights) < weights[0].shape[1]:
        return _decompose_wide(weights, klt, choose_rank)
    mapped = gram(weights, "input")
    if klt is not None:  # T^T G T = diag(root) V^T G V diag(root)
        vectors, root = klt.factors()
        mapped = vectors.T @ mapped  # two steps, so G is freed before the second product
        mapped = mapped @ vectors
        mapped.mul_(root[:, None]).mul_(root[None, :])
    singular, rho, eigenvectors = spectrum(mapped)
    del mapped
    basis = _top(eigenvectors, choose_rank(rho))  # B_k [ic, k], orthonormal in KLT space
    del eigenvectors
    if klt is None:
        lift, shared_basis = basis, basis.T.contiguous()
    else:
        lift = vectors @ (basis * root[:, None])  # T B_k [ic, k]
        shared_basis = (vectors @ (basis / root[:, None])).T.contiguous()  # B_k^T T^-1 [k, ic]
    coeffs = [w.double() @ lift for w in weights]
    return SharedDecomposition("input", shared_basis, coeffs, singular, rho)


def _decompose_wide(weights: list[torch.Tensor], klt: Klt | None, choose_rank: RankChooser) -> SharedDecomposition:
    """`decompose` on the input side for a stack `S` [R, ic] with R < ic, from its row-side Gram
    `S C S^T` [R, R] (C the damped second moment; I without KLT). The spectrum is padded with zeros to
    ic entries (rho with its final value), the shape the column-side path gives."""
    stack = torch.cat([w.double() for w in weights])
    rows, dim = stack.shape
    row_gram = stack @ klt.second_moment() @ stack.T if klt is not None else stack @ stack.T
    eigenvalues, vectors = torch.linalg.eigh((row_gram + row_gram.T) / 2)
    eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
    singular = eigenvalues.sqrt()
    rho = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-300)
    rank = choose_rank(torch.cat([rho, rho[-1:].expand(dim - rows)]))
    kept = min(rank, rows)
    inverse_singular = torch.where(singular[:kept] > 0, 1 / singular[:kept].clamp_min(1e-300), 0.0)
    shared_basis = torch.zeros(rank, dim, dtype=torch.float64, device=stack.device)
    shared_basis[:kept] = (vectors[:, :kept] * inverse_singular).T @ stack  # B_k^T T^-1 = U_k^T S / s_k
    coeffs = torch.zeros(rows, rank, dtype=torch.float64, device=stack.device)
    coeffs[:, :kept] = vectors[:, :kept] * singular[:kept]  # S T B_k = U_k s_k
    padded = torch.zeros(dim - rows, dtype=torch.float64, device=stack.device)
    return SharedDecomposition("input", shared_basis, list(coeffs.split([w.shape[0] for w in weights])),
                               torch.cat([singular, padded]), torch.cat([rho, rho[-1:].expand(dim - rows)]))
