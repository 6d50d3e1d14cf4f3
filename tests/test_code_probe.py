"""The measured VQ error factor of a code size (kbvq_cli/code_probe.py), on small matrices against float64."""

import torch

from kbvq_cli.code_probe import kmeans_codebook, vq_error_factor


def _weight(oc=16, ic=32, seed=0):
    return torch.randn(oc, ic, generator=torch.Generator().manual_seed(seed))


def _reference_error(weight, codebook, dim, moment):
    points = weight.double().reshape(-1, dim)
    nearest = torch.cdist(points, codebook.double()).argmin(1)
    error = (points - codebook.double()[nearest]).reshape(weight.shape)
    output = lambda m: float(torch.trace(m @ moment.double() @ m.T))  # noqa: E731
    return output(error) / output(weight.double())


def test_the_factor_is_the_output_error_of_the_fitted_codebook():
    weight = _weight()
    moment = (lambda a: a @ a.T)(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    codebook = kmeans_codebook(weight.reshape(-1, 2).contiguous(), 16)
    assert abs(vq_error_factor(weight, moment, 2, 2) - _reference_error(weight, codebook, 2, moment)) < 1e-6
    plain = vq_error_factor(weight, None, 2, 2)
    assert abs(plain - vq_error_factor(weight, torch.eye(32), 2, 2)) < 1e-9
    assert 0 < plain < 1 and vq_error_factor(weight, None, 2, 2) == plain  # deterministic


def test_more_bits_leave_less_and_a_codeword_per_point_leaves_nothing():
    weight = _weight()
    factors = [vq_error_factor(weight, None, bits, 2) for bits in (2, 3, 4)]
    assert factors[0] > factors[1] > factors[2]
    assert vq_error_factor(weight, None, 3, 4) == 0.0  # 128 sub-vectors, 4096 codewords: each its own


def test_lloyd_does_not_raise_the_error_of_its_start():
    points = _weight(64, 4).reshape(-1, 2).contiguous()
    start = kmeans_codebook(points, 8, iters=0)
    fitted = kmeans_codebook(points, 8, iters=10)
    error = lambda c: float(torch.cdist(points.double(), c.double()).min(1).values.pow(2).sum())  # noqa: E731
    assert error(fitted) <= error(start) + 1e-9
