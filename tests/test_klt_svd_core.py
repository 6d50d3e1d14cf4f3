"""IDRE math against float64 references on small tensors."""

import pytest
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.output_error import output_error
from stages.klt_svd.core import damped_klt, decompose, identity_klt, select_rank, shared_part

G = torch.Generator().manual_seed(0)


def random_second_moment(dim, tokens=400):
    x = torch.randn(tokens, dim, generator=G, dtype=torch.float64) * torch.linspace(0.1, 3, dim, dtype=torch.float64)
    return x.T @ x / (tokens - 1)


def experts(n=6, oc=12, ic=16):
    return [torch.randn(oc, ic, generator=G, dtype=torch.float64) for _ in range(n)]


def fixed(k):
    return lambda rho: k


def test_klt_maps_error_norm_to_output_mse():
    c = random_second_moment(16)
    klt = damped_klt(c, 0.01)
    damped = c + 0.01 * c.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(klt.transform @ klt.transform.T, damped, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(klt.transform @ klt.inverse, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-10)
    error = torch.randn(5, 16, generator=G, dtype=torch.float64)
    lhs = (error @ klt.transform).pow(2).sum()
    torch.testing.assert_close(lhs, output_error(error, damped), rtol=1e-12, atol=0)


def test_parts_add_up_and_full_rank_is_exact():
    weights, klt = experts(), damped_klt(random_second_moment(16), 0.01)
    result = decompose(weights + [torch.randn(20, 16, generator=G, dtype=torch.float64)], klt, fixed(3))
    assert result.shared_basis.shape == (3, 16) and result.expert_coeffs[-1].shape == (20, 3)
    for w, coeffs in zip(weights, result.expert_coeffs):
        share = shared_part("input", result.shared_basis, coeffs)
        torch.testing.assert_close(share + (w - share), w, rtol=0, atol=1e-13)
    full = decompose(weights, klt, fixed(16))
    for w, coeffs in zip(weights, full.expert_coeffs):
        torch.testing.assert_close(shared_part("input", full.shared_basis, coeffs), w, rtol=1e-9, atol=1e-9)


def test_rho_matches_direct_svd_of_mapped_stack():
    weights, klt = experts(), damped_klt(random_second_moment(16), 0.01)
    result = decompose(weights, klt, fixed(4))
    stacked = torch.cat([w @ klt.transform for w in weights])
    singular = torch.linalg.svdvals(stacked)
    torch.testing.assert_close(result.singular_values[: singular.numel()], singular, rtol=1e-9, atol=1e-9)
    expected = singular.pow(2).cumsum(0) / singular.pow(2).sum()
    torch.testing.assert_close(result.rho[: singular.numel()], expected, rtol=1e-10, atol=1e-12)
    residual_energy = sum(((w - shared_part("input", result.shared_basis, v)) @ klt.transform).pow(2).sum()
                          for w, v in zip(weights, result.expert_coeffs))
    torch.testing.assert_close(residual_energy / stacked.pow(2).sum(), 1 - result.rho[3], rtol=1e-9, atol=1e-12)


def test_klt_lowers_output_error_against_plain_svd():
    c = random_second_moment(16)
    klt = damped_klt(c, 0.0)
    weights = experts()
    with_klt, without = decompose(weights, klt, fixed(4)), decompose(weights, identity_klt(16), fixed(4))

    def total(result):
        return sum(output_error(w - shared_part("input", result.shared_basis, v), c)
                   for w, v in zip(weights, result.expert_coeffs))
    assert total(with_klt) < total(without)
    assert torch.allclose(decompose(weights, None, fixed(4)).shared_basis.abs(), without.shared_basis.abs())


def test_planted_shared_subspace_is_found():
    shared = torch.randn(3, 32, generator=G, dtype=torch.float64)
    weights = [torch.randn(10, 3, generator=G, dtype=torch.float64) @ shared
               + 1e-6 * torch.randn(10, 32, generator=G, dtype=torch.float64) for _ in range(5)]
    result = decompose(weights, identity_klt(32), fixed(3))
    assert result.rho[2] > 1 - 1e-9
    for w, v in zip(weights, result.expert_coeffs):
        assert (w - shared_part("input", result.shared_basis, v)).abs().max() < 1e-5


def test_output_side_shares_the_output_space():
    basis = torch.randn(12, 2, generator=G, dtype=torch.float64)
    weights = [basis @ torch.randn(2, 9 + i, generator=G, dtype=torch.float64) for i in range(4)]
    result = decompose(weights, None, fixed(2), side="output")
    assert result.shared_basis.shape == (2, 12) and result.expert_coeffs[3].shape == (2, 12)
    for w, coeffs in zip(weights, result.expert_coeffs):
        torch.testing.assert_close(shared_part("output", result.shared_basis, coeffs), w, rtol=1e-9, atol=1e-9)


def test_rank_zero_gives_no_shared_part():
    result = decompose(experts(), identity_klt(16), fixed(0))
    assert result.rank == 0 and result.expert_coeffs[0].shape == (12, 0)
    assert shared_part("input", result.shared_basis, result.expert_coeffs[0]).abs().max() == 0


def test_rank_options():
    rho = torch.tensor([0.5, 0.7, 0.8, 0.9, 1.0], dtype=torch.float64)
    assert select_rank(rho, 1408, 2048) == 5  # 1408/128 = 11, capped at the spectrum's length
    assert select_rank(torch.linspace(0, 1, 2048, dtype=torch.float64), 1408, 2048) == 11
    assert select_rank(torch.linspace(0, 1, 2048, dtype=torch.float64), 100, 2048) == 1  # at least 1
    assert select_rank(rho, 64, 64, rank_ratio=1 / 32) == 2
    assert select_rank(rho, 64, 64, rank=0) == 0
    assert select_rank(rho, 64, 64, energy=0.7) == 2
    assert select_rank(rho, 64, 64, energy=0.75) == 3
    with pytest.raises(KbvqError, match="only one of"):
        select_rank(rho, 64, 64, rank=1, energy=0.5)
    with pytest.raises(KbvqError, match="energy must be"):
        select_rank(rho, 64, 64, energy=1.5)


def reference_shared_parts(weights, klt, k):
    """W_share of each weight from the column-side route written out: T, T^T G T, its top-k B_k."""
    transform, inverse = klt.transform, klt.inverse
    mapped = transform.T @ sum(w.T @ w for w in weights) @ transform
    vectors = torch.linalg.eigh(mapped).eigenvectors.flip(1)[:, :k]
    return [w @ transform @ vectors @ vectors.T @ inverse for w in weights]


@pytest.mark.parametrize("with_klt", [True, False])
def test_wide_stack_uses_the_row_side_gram_with_the_same_shared_parts(with_klt, monkeypatch):
    """A stack with fewer rows than columns (a shared expert's down) gives the column route's W_share and
    rho from one eigendecomposition of rows x rows, and never factors the ic x ic KLT."""
    weights = [torch.randn(6, 20, generator=G, dtype=torch.float64), torch.randn(4, 20, generator=G, dtype=torch.float64)]
    c = random_second_moment(20)
    klt = damped_klt(c, 0.01) if with_klt else identity_klt(20)
    sizes, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: sizes.append(m.shape[0]) or eigh(m))
    result = decompose(weights, klt if with_klt else None, fixed(3))
    assert sizes == [10]  # the 10 x 10 row-side Gram only
    reference_klt = damped_klt(c, 0.01) if with_klt else identity_klt(20)
    for w, coeffs, expected in zip(weights, result.expert_coeffs, reference_shared_parts(weights, reference_klt, 3)):
        torch.testing.assert_close(shared_part("input", result.shared_basis, coeffs), expected, rtol=1e-9, atol=1e-9)
    assert result.singular_values.shape == (20,) and torch.all(result.singular_values[10:] == 0)
    stacked = torch.cat(weights) @ reference_klt.transform
    torch.testing.assert_close(result.rho[:10], torch.linalg.svdvals(stacked).pow(2).cumsum(0) / stacked.pow(2).sum(),
                               rtol=1e-9, atol=1e-12)


def test_one_klt_is_factored_once_for_every_projection_that_shares_it(monkeypatch):
    """gate and up share the block input's KLT: one Cholesky factorization of C (no eigendecomposition
    of it), one eigendecomposition of each mapped Gram."""
    klt = damped_klt(random_second_moment(16), 0.01)
    sizes, eigh = [], torch.linalg.eigh
    factored, cholesky = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: sizes.append(m.shape[0]) or eigh(m))
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m: factored.append(m.shape[0]) or cholesky(m))
    for _ in ("gate", "up"):
        decompose(experts(), klt, fixed(3))
    assert sizes == [16, 16] and factored == [16]


def eigen_klt_shared_parts(weights, c, k):
    """W_share from the paper's KLT T = V diag(sqrt(lambda)) of the damped C, written out in float64."""
    damped = c + 0.01 * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(damped)
    transform = vectors * eigenvalues.sqrt()
    mapped = transform.T @ sum(w.T @ w for w in weights) @ transform
    basis = torch.linalg.eigh(mapped).eigenvectors.flip(1)[:, :k]
    return [w @ transform @ basis @ basis.T @ torch.linalg.inv(transform) for w in weights]


def test_cholesky_klt_gives_the_eigen_klt_shared_parts():
    """T = chol(C) and T = V diag(root) differ by an orthogonal factor, to which W_share is invariant."""
    c, weights = random_second_moment(16), experts()
    result = decompose(weights, damped_klt(c, 0.01), fixed(4))
    for w, coeffs, expected in zip(weights, result.expert_coeffs, eigen_klt_shared_parts(weights, c, 4)):
        torch.testing.assert_close(shared_part("input", result.shared_basis, coeffs), expected, rtol=0, atol=1e-10)


def test_singular_second_moment_falls_back_to_the_clamped_eigen_klt():
    """damp 0 on a rank-deficient C: Cholesky fails, T = V diag(root) with clamped eigenvalues stays invertible."""
    x = torch.randn(5, 12, generator=G, dtype=torch.float64)
    klt = damped_klt(x.T @ x, 0.0)
    assert torch.isfinite(klt.inverse).all()
    torch.testing.assert_close(klt.transform @ klt.transform.T, x.T @ x, rtol=0, atol=1e-9)


def decaying_experts(n=8, oc=30, ic=120):
    scale = torch.logspace(0, -1.5, ic, dtype=torch.float64)
    return [torch.randn(oc, ic, generator=G, dtype=torch.float64) * scale for _ in range(n)]


@pytest.mark.parametrize("with_klt", [True, False])
def test_leading_eigenpairs_route_equals_the_full_eigendecomposition(with_klt):
    """The wide-input route (k leading eigenpairs by block Krylov, mapped Gram never formed) gives the
    full route's W_share to 1e-7 relative and its rho_1..rho_k to 1e-10; rho is against the exact energy."""
    weights, c = decaying_experts(), random_second_moment(120)
    full = decompose(weights, damped_klt(c, 0.01) if with_klt else None, fixed(5))
    leading = decompose(weights, damped_klt(c, 0.01) if with_klt else None, fixed(5), fixed_rank=5, leading_above=0)
    assert leading.rho.shape == (5,) and leading.singular_values.shape == (5,)
    torch.testing.assert_close(leading.rho, full.rho[:5], rtol=0, atol=1e-10)
    torch.testing.assert_close(leading.singular_values, full.singular_values[:5], rtol=1e-10, atol=0)
    for w, a, b in zip(weights, full.expert_coeffs, leading.expert_coeffs):
        expected = shared_part("input", full.shared_basis, a)
        assert (shared_part("input", leading.shared_basis, b) - expected).norm() <= 1e-7 * expected.norm()


def test_leading_eigenpairs_are_exact_and_deterministic():
    from stages.klt_svd.leading import leading_eigenpairs

    w = torch.randn(300, 100, generator=G, dtype=torch.float64)  # a flat (Marchenko-Pastur) spectrum, the hard case
    m = w.T @ w
    values, vectors, residual = leading_eigenpairs(lambda x: m @ x, 100, 6, block=8)
    again = leading_eigenpairs(lambda x: m @ x, 100, 6, block=8)
    assert torch.equal(values, again[0]) and torch.equal(vectors, again[1])
    expected_values, expected_vectors = torch.linalg.eigh(m)
    torch.testing.assert_close(values, expected_values.flip(0)[:6], rtol=1e-12, atol=0)
    projector = expected_vectors[:, -6:] @ expected_vectors[:, -6:].T
    assert residual <= 1e-8 and (vectors @ vectors.T - projector).norm() < 1e-6
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["input", "output"])
def test_gram_from_its_upper_block_triangle_equals_the_whole_product(side):
    """gram multiplies only the upper block triangle of each float32 W^T W and sums it in float64."""
    from stages.klt_svd.core import gram

    weights = [torch.randn(40, 24, generator=G) for _ in range(3)]
    expected = sum((w.T @ w if side == "input" else w @ w.T).double() for w in weights)
    for tile in (5, 24, 1024):
        torch.testing.assert_close(gram(weights, side, tile), expected, rtol=1e-6, atol=1e-5)
    exact = [w.double() for w in weights]
    torch.testing.assert_close(gram(exact, side, 7), sum(w.T @ w if side == "input" else w @ w.T for w in exact),
                               rtol=1e-14, atol=1e-12)


@pytest.mark.parametrize("dim,tile", [(5, 1024), (1030, 1024), (300, 7)])
def test_in_place_symmetrization_equals_the_out_of_place_one(dim, tile):
    """klt-svd symmetrizes its ic x ic Gram matrices in place (no second 1.6 GB matrix at Mixtral's
    14336-wide down input), with the very values of `(M + M^T) / 2`."""
    from stages.klt_svd.core import _symmetrized

    matrix = torch.randn(dim, dim, generator=G, dtype=torch.float64)
    assert torch.equal(_symmetrized(matrix.clone(), tile), (matrix + matrix.T) / 2)
