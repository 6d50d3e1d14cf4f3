"""vq math (docs/method.md §3): k-means++ / Lloyd invariants, assignment, backends, determinism, validation."""

import pytest
import torch

from kbvq_cli.errors import KbvqError
from stages.vq.backends import FaissBackend, TorchBackend, make_backend
from stages.vq.core import (cluster_sums, codebook_size, dequantize, kmeans, kmeans_pp, sum_squared_error,
                            to_subvectors, vq_quantize)

BACKENDS = ("faiss", "torch")


def expert_weight(seed: int, oc: int = 48, ic: int = 128) -> torch.Tensor:
    """A heavy-tailed stand-in for an expert matrix [oc, ic] float32 (Student-t(4), std ~0.02)."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(oc, ic, generator=generator)
    chi = torch.randn(4, oc, ic, generator=generator).square().sum(0) / 4
    return 0.014 * normal / chi.sqrt()


def brute_force(points: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 argmin and min of squared distances, [N, d] x [K, d] -> [N], [N]."""
    distances = (points.double()[:, None] - codebook.double()[None]).square().sum(-1)
    return distances.argmin(1), distances.min(1).values


def quantize(weight, backend, bits=2, iters=25, seed=42, on_iteration=None):
    return vq_quantize(weight, bits, 4, iters, seed, make_backend(backend), on_iteration)


@pytest.mark.parametrize("backend", BACKENDS)
def test_objective_never_increases(backend):
    result = quantize(expert_weight(0), backend)
    objective = torch.tensor(result.objective, dtype=torch.float64)
    assert len(objective) == result.iterations + 1
    assert (objective[1:] <= objective[:-1]).all(), objective
    assert objective[-1] < 0.7 * objective[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_assign_equals_brute_force_argmin(backend):
    points = to_subvectors(expert_weight(1), 4)
    codebook = points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:256]] * 0.9
    indices, distances = make_backend(backend).assign(points, codebook)
    expected, expected_distances = brute_force(points, codebook)
    mismatched = indices != expected
    # ties aside: a different choice must be exactly as close in float64
    chosen = (points.double() - codebook.double()[indices]).square().sum(-1)
    assert torch.allclose(chosen[mismatched], expected_distances[mismatched], rtol=1e-6, atol=0)
    assert mismatched.float().mean() < 1e-3
    assert torch.allclose(distances.double(), expected_distances, rtol=1e-4, atol=1e-9)


def test_backends_agree_on_one_codebook_and_after_kmeans():
    weight = expert_weight(2)
    points = to_subvectors(weight, 4)
    codebook = points[torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:256]]
    faiss_indices, _ = FaissBackend().assign(points, codebook)
    torch_indices, _ = TorchBackend(chunk_elements=1 << 14).assign(points, codebook)
    assert (faiss_indices != torch_indices).float().mean() < 1e-3  # float32 ties aside
    results = [quantize(weight, name, iters=20) for name in BACKENDS]
    assert results[0].objective[-1] == pytest.approx(results[1].objective[-1], rel=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_bit_identical_results(backend):
    weight = expert_weight(3)
    first, second = (quantize(weight, backend, iters=10, seed=7) for _ in range(2))
    assert torch.equal(first.codebook, second.codebook) and torch.equal(first.indices, second.indices)
    assert first.objective == second.objective
    other = quantize(weight, backend, iters=10, seed=8)
    assert not torch.equal(first.codebook, other.codebook)


def test_cluster_sums_equal_a_float64_reference():
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(5000, 4, generator=generator)
    indices = torch.randint(300, (5000,), generator=generator)
    sums, counts = cluster_sums(points, indices, 300)
    expected = torch.zeros(300, 4, dtype=torch.float64).index_add_(0, indices, points.double())
    assert torch.allclose(sums, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, torch.bincount(indices, minlength=300))


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_the_compiled_cluster_sums_are_the_bincounts_bit_for_bit(dim):
    """The compiled one-pass centroid sums (the CPU default where the kernels build) add each cluster's
    points in the order and precision of the per-coordinate weighted bincounts: equal bit for bit, so
    codebooks do not depend on whether a compiler is there. Cluster 7 empty."""
    from kbvq_cli.kernels import cpu_backend
    from stages.vq.core import bincount_cluster_sums, compiled_sums

    if not cpu_backend.available():
        pytest.skip(cpu_backend.unavailable_reason())
    generator = torch.Generator().manual_seed(6)
    points = torch.randn(20000, dim, generator=generator) * torch.rand(20000, 1, generator=generator) * 1e3
    indices = torch.randint(0, 60, (20000,), generator=generator)
    indices[indices == 7] = 8
    assert compiled_sums(points, indices)
    sums, counts = cluster_sums(points, indices, 64)
    expected_sums, expected_counts = bincount_cluster_sums(points, indices, 64)
    assert torch.equal(sums, expected_sums) and torch.equal(counts, expected_counts)
    with pytest.raises(ValueError, match="outside"):
        cpu_backend.cluster_sums(points, indices, 8)


def test_kmeans_pp_is_seeded_and_picks_data_points():
    points = to_subvectors(expert_weight(5), 4)
    first = kmeans_pp(points, 64, torch.Generator().manual_seed(1))
    second = kmeans_pp(points, 64, torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert all(bool((points == centre).all(1).any()) for centre in first)
    assert torch.unique(first, dim=0).shape[0] == 64  # D^2 sampling never repeats a chosen point


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_distinct_points_than_codewords_reseeds_without_nan(backend):
    """60 distinct sub-vectors for 256 codewords: k-means++ repeats centres, Lloyd re-seeds empties."""
    generator = torch.Generator().manual_seed(8)
    distinct = torch.randn(60, 4, generator=generator)
    points = distinct[torch.randint(60, (4000,), generator=generator)].contiguous()
    codebook, indices, _, _ = kmeans(points, 256, 5, 42, make_backend(backend))
    assert torch.isfinite(codebook).all()
    assert sum_squared_error(points, codebook, indices) == 0.0  # every distinct point ends on a codeword


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_clusters_are_reseeded_during_lloyd(backend):
    """Far outliers seeded as codewords lose their points at once: the update must not leave NaN."""
    generator = torch.Generator().manual_seed(9)
    points = torch.cat([torch.randn(3000, 4, generator=generator), torch.full((4, 4), 1e3)])
    codebook, _, objective, _ = kmeans(points, 32, 10, 42, make_backend(backend))
    assert torch.isfinite(codebook).all() and all(o == o for o in objective)


def test_result_shapes_and_dequantize():
    weight = expert_weight(7, oc=16, ic=64)
    result = quantize(weight, "faiss", iters=5)
    assert result.codebook.shape == (256, 4) and result.codebook.dtype == torch.float32
    assert result.indices.shape == (16, 16) and result.indices.dtype == torch.int64
    rebuilt = dequantize(result.indices.int(), result.codebook, (16, 64))
    assert torch.equal(rebuilt, result.codebook[result.indices].reshape(16, 64))
    error = float((rebuilt.double() - weight.double()).square().sum())
    assert error == pytest.approx(result.objective[-1], rel=1e-4)


def test_tiny_matrix_with_more_codewords_than_subvectors():
    weight = expert_weight(9, oc=8, ic=8)  # 16 sub-vectors, 4096 codewords
    result = quantize(weight, "faiss", bits=3, iters=3)
    assert torch.isfinite(result.codebook).all()
    assert torch.allclose(dequantize(result.indices, result.codebook, (8, 8)), weight)


def test_progress_callback_sees_each_iteration():
    seen = []
    quantize(expert_weight(10), "faiss", iters=4, on_iteration=lambda step, objective: seen.append(step))
    assert seen == [1, 2, 3, 4]


@pytest.mark.parametrize("bits, dim", [(4, 4), (1, 4), (5, 2), (2, 3)])
def test_bits_and_dim_validation(bits, dim):
    with pytest.raises(KbvqError, match="bits 2 or 3 with dim 4"):
        codebook_size(bits, dim)


def test_sizes_and_shape_errors():
    assert codebook_size(2, 4) == 256 and codebook_size(3, 4) == 4096 and codebook_size(4, 2) == 256
    with pytest.raises(KbvqError, match="not a multiple of the vector length"):
        to_subvectors(torch.zeros(4, 10), 4)
    with pytest.raises(KbvqError, match="unknown vq backend"):
        make_backend("annoy")


def test_the_gpu_cluster_sums_equal_the_cpu_ones():
    """`sorted_cluster_sums` is what CUDA runs (no atomics); checked here on the CPU against bincount
    and a float64 loop, with empty clusters."""
    from stages.vq.core import cluster_sums, sorted_cluster_sums

    generator = torch.Generator().manual_seed(3)
    points = torch.randn(5000, 4, generator=generator)
    indices = torch.randint(0, 60, (5000,), generator=generator)
    indices[indices == 7] = 8  # cluster 7 empty
    sums, counts = cluster_sums(points, indices, 64)
    gpu_path = sorted_cluster_sums(points, indices, counts)
    reference = torch.stack([points.double()[indices == c].sum(0) for c in range(64)])
    assert torch.allclose(gpu_path, reference, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sums, reference, rtol=1e-12, atol=1e-12)
    assert int(counts[7]) == 0 and torch.equal(gpu_path[7], torch.zeros(4, dtype=torch.float64))


def test_kmeans_pp_with_fewer_points_than_codewords_takes_every_point_then_repeats_them_in_order():
    points = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    centres = kmeans_pp(points, 12, torch.Generator().manual_seed(1))
    first = {tuple(row.tolist()) for row in centres[:5]}
    assert first == {tuple(row.tolist()) for row in points}  # D(x)^2 never draws a point twice while one is left
    assert torch.equal(centres[5:], points[torch.arange(5, 12) % 5])
