"""IDRE, the KLT-guided SVD of docs/method.md §2, as pure float64 tensor math.

Input-shared decomposition (gate, up, and `down` pooled): with `C = T T^T` the damped input second
moment, every expert is mapped to `What_i = W_i T`; the stack `[What_1; ...; What_n]` is decomposed by
the eigendecomposition of its Gram matrix `sum_i What_i^T What_i` (`ic x ic`, small whatever the number
of experts, and exact in float64 for the leading subspace); with `B_k` its top-k eigenvectors:
`shared_basis = B_k^T T^-1` (`k x ic`), `expert_coeffs_i = W_i T B_k` (`oc_i x k`),
`W_share_i = expert_coeffs_i @ shared_basis`. T is C's Cholesky factor (`Klt` says why any T with
T T^T = C gives the same parts). Where the rank is fixed up front and ic is wide (Mixtral's 14336-wide
down input), only the k leading eigenpairs of the mapped Gram are computed (`stages.klt_svd.leading`).

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
from stages.klt_svd.leading import leading_eigenpairs

Side = Literal["input", "output"]


class Klt:
    """The damped second moment `damped` = C + damp mean(diag C) I [ic, ic] float64, and a KLT `T` with
    T T^T = damped, factored on first use (a decomposition that needs only `damped` never factors it).

    Any such T gives the same shared parts: T' = T Q (Q orthogonal) maps the Gram matrix to Q^T (T^T G T) Q,
    whose eigenvectors are Q^T B, so T' B' = T B and B'^T T'^-1 = B^T T^-1. So T is the Cholesky factor
    L (n^3/3 flops, against about 9 n^3 for an eigendecomposition; 12 minutes on two cores at Mixtral's
    14336-wide down input); a C that is not numerically positive definite (damp 0 on a singular C) falls
    back to the eigenvector form T = V diag(root), its eigenvalues clamped so that T stays invertible.
    `damped` is dropped once T exists: at 14336 wide each such matrix is 1.6 GB.
    """

    def __init__(self, damped: torch.Tensor | None, transform: torch.Tensor | None = None, triangular: bool = False):
        self.damped = damped
        self._transform = transform
        self._triangular = triangular

    def factor(self) -> torch.Tensor:
        """T [ic, ic] float64 (lower triangular unless C needed the eigenvector fallback)."""
        if self._transform is None:
            lower, info = torch.linalg.cholesky_ex(self.damped)
            if int(info) == 0:
                self._transform, self._triangular = lower, True
            else:
                del lower
                eigenvalues, eigenvectors = torch.linalg.eigh(self.damped)
                eigenvalues = eigenvalues.clamp_min(eigenvalues.max() * 1e-12)
                self._transform = eigenvectors.mul_(eigenvalues.sqrt())
            self.damped = None
        return self._transform

    def second_moment(self) -> torch.Tensor:
        """The damped second moment, [ic, ic] float64 (rebuilt from T once T replaced it)."""
        if self.damped is not None:
            return self.damped
        return self._transform @ self._transform.T

    def energy(self, gram_matrix: torch.Tensor) -> torch.Tensor:
        """Tr(T^T G T) = <G, C>, the mapped stack's total energy, before or after factoring."""
        if self.damped is not None:
            return gram_matrix.reshape(-1) @ self.damped.reshape(-1)
        return ((gram_matrix @ self._transform) * self._transform).sum()

    def lift(self, vectors: torch.Tensor) -> torch.Tensor:
        """T B [ic, k] of KLT-space vectors B [ic, k]."""
        return self.factor() @ vectors

    def unlift(self, vectors: torch.Tensor) -> torch.Tensor:
        """B^T T^-1 [k, ic]: a triangular solve (T^-T B), never T^-1 itself."""
        transform = self.factor()
        if self._triangular:
            return torch.linalg.solve_triangular(transform.T, vectors, upper=True).T.contiguous()
        return torch.linalg.solve(transform.T, vectors).T.contiguous()

    @property
    def transform(self) -> torch.Tensor:
        return self.factor()

    @property
    def inverse(self) -> torch.Tensor:
        transform = self.factor()
        return self.unlift(torch.eye(transform.shape[0], dtype=torch.float64, device=transform.device))


def damped_klt(second_moment: torch.Tensor, damp: float, overwrite: bool = False) -> Klt:
    """KLT of `C + damp * mean(diag C) * I` (docs/method.md §2 steps 1-2). second_moment [ic, ic].

    `overwrite`: symmetrize and damp a float64 `second_moment` in its own memory (the caller's tensor is
    consumed: no second 1.6 GB matrix at 14336 wide); the values are those of the out-of-place form.
    """
    c = second_moment.double()
    if not overwrite and c is second_moment:
        c = c.clone()
    c = _symmetrized(c)  # sums in float32 are symmetric only to rounding
    c.diagonal().add_(damp * c.diagonal().mean().clamp_min(1e-30))
    return Klt(c)


def identity_klt(dim: int, device=None) -> Klt:
    """T = I: the "SVD without KLT" ablation (Tables 3, 14)."""
    return Klt(None, torch.eye(dim, dtype=torch.float64, device=device), triangular=True)


def gram(matrices: list[torch.Tensor], side: Side, tile: int = 1024) -> torch.Tensor:
    """`sum_i W_i^T W_i` (input side, [ic, ic]) or `sum_i W_i W_i^T` (output side), accumulated in float64.

    Each product is taken in the matrices' own dtype: float64 inputs give an exact float64 result,
    float32 ones run at full float32 speed and are summed in float64 (added in place, with no float64
    copy of each product). Only the upper block triangle is multiplied, `tile` columns at a time, and
    mirrored: 30% less time than the whole product at Mixtral's 14336-wide down input.
    """
    total = None
    for w in matrices:
        columns = w if side == "input" else w.T
        dim = columns.shape[1]
        if total is None:
            total = torch.zeros(dim, dim, dtype=torch.float64, device=w.device)
        for start in range(0, dim, tile):
            stop = min(start + tile, dim)
            panel = columns[:, start:stop].T @ columns[:, start:]  # rows start:stop, columns start: of W^T W
            total[start:stop, start:].add_(panel)
            total[stop:, start:stop].add_(panel[:, stop - start:].T)
            del panel
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


LEADING_ONLY_ABOVE = 8192  # wider input spaces get only their leading eigenpairs when the rank is known up front


def decompose(weights: list[torch.Tensor], klt: Klt | None, choose_rank: RankChooser, side: Side = "input",
              fixed_rank: int | None = None, leading_above: int = LEADING_ONLY_ABOVE) -> SharedDecomposition:
    """Shared basis and per-expert coefficients of `weights` (each [oc_i, ic]; or [oc, ic_i] on the output side).

    `klt` maps the input space (input side only; None or `identity_klt` for plain SVD).
    `choose_rank(rho)` picks k from the energy curve; `fixed_rank` instead, when k does not depend on it
    (a rank ratio or an absolute rank). Then an input side wider than `leading_above` is decomposed from
    its k leading eigenpairs only (`leading.leading_eigenpairs`, to a 1e-8 relative residual), and its
    `singular_values` and `rho` hold those k entries (rho against the exact total energy).
    """
    if fixed_rank is not None:
        choose_rank = lambda rho: min(fixed_rank, int(rho.numel()))  # noqa: E731
    if side == "output":
        singular, rho, vectors = spectrum(gram(weights, "output"))
        basis = _top(vectors, choose_rank(rho))  # [oc, k]
        coeffs = [basis.T @ w.double() for w in weights]
        return SharedDecomposition("output", basis.T.contiguous(), coeffs, singular, rho)
    if sum(w.shape[0] for w in weights) < weights[0].shape[1]:
        return _decompose_wide(weights, klt, choose_rank)
    if fixed_rank is not None and weights[0].shape[1] > leading_above:
        return _decompose_leading(weights, klt, min(fixed_rank, weights[0].shape[1]))
    mapped = gram(weights, "input")
    if klt is not None:  # T^T G T, in two steps so that G is freed before the second product
        transform = klt.factor()
        mapped = transform.T @ mapped
        mapped = mapped @ transform
    singular, rho, eigenvectors = spectrum(mapped)
    del mapped
    basis = _top(eigenvectors, choose_rank(rho))  # B_k [ic, k], orthonormal in KLT space
    del eigenvectors
    return _lifted(weights, klt, basis, singular, rho)


def _lifted(weights, klt: Klt | None, basis: torch.Tensor, singular, rho) -> SharedDecomposition:
    """The input-side parts from B_k: shared_basis = B_k^T T^-1, expert_coeffs_i = W_i T B_k."""
    if klt is None:
        lift, shared_basis = basis, basis.T.contiguous()
    else:
        lift, shared_basis = klt.lift(basis), klt.unlift(basis)
    # in the weights' own dtype (float32 in the stage: its rounding is far below the 16-bit store's),
    # without a float64 copy of every expert (3.8 GB at Mixtral's gate); float64 inputs stay exact
    coeffs = [(w @ lift.to(w.dtype)).double() for w in weights]
    return SharedDecomposition("input", shared_basis, coeffs, singular, rho)


def _decompose_leading(weights: list[torch.Tensor], klt: Klt | None, rank: int) -> SharedDecomposition:
    """The input side from the k leading eigenpairs of T^T G T, applied as T^T (G (T X)): neither the
    mapped Gram nor any full eigendecomposition is formed. The total energy Tr(T^T G T) = <G, C> is exact."""
    grams = gram(weights, "input")
    total = (klt.energy(grams) if klt is not None else grams.trace()).clamp_min(1e-300)
    transform = klt.factor() if klt is not None else None

    def apply(block: torch.Tensor) -> torch.Tensor:
        if transform is None:
            return grams @ block
        return transform.T @ (grams @ (transform @ block))

    eigenvalues, basis, _ = leading_eigenpairs(apply, grams.shape[0], rank, device=grams.device)
    del grams
    eigenvalues = eigenvalues.clamp_min(0)
    return _lifted(weights, klt, basis, eigenvalues.sqrt(), eigenvalues.cumsum(0) / total)


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
