"""BCOS closed form (docs/method.md §4) against explicit float64 data passes."""

import pytest
import torch

from kbvq_cli.errors import KbvqError
from stages.bcos.core import (apply_correction, bcos_correction, input_moments, output_moments)

OC, IC, N = 24, 16, 4000


def sample_inputs(seed: int, n: int = N) -> torch.Tensor:
    """Correlated inputs with a non-zero mean, like normed hidden states [n, IC] float64."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IC, IC, generator=generator, dtype=torch.float64) / IC ** 0.5
    offset = torch.randn(IC, generator=generator, dtype=torch.float64)
    return torch.randn(n, IC, generator=generator, dtype=torch.float64) @ mixing + offset


def weights(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [OC, IC] and a 'quantized' copy: shrunk (as k-means codewords are) plus noise."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OC, IC, generator=generator, dtype=torch.float64)
    quantized = 0.9 * weight + 0.2 * torch.randn(OC, IC, generator=generator, dtype=torch.float64)
    return weight, quantized


def moments_of(x: torch.Tensor):
    return input_moments(x.sum(0), x.T @ x, x.shape[0])


def stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y.mean(0), y.std(0, unbiased=False)


def test_closed_form_moments_equal_explicit_pass():
    x = sample_inputs(0)
    weight, _ = weights()
    moments = moments_of(x)
    assert torch.allclose(moments.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(moments.covariance, torch.cov(x.T, correction=0), rtol=1e-10, atol=1e-12)
    closed = output_moments(weight, moments)
    mean, std = stats(x @ weight.T)
    assert torch.allclose(closed.mean, mean, rtol=1e-10, atol=1e-10)
    assert torch.allclose(closed.std, std, rtol=1e-10)


def test_full_correction_matches_full_precision_mean_and_std():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x), mode="full")
    mean, std = stats(x @ weight.T)
    mean_corr, std_corr = stats(apply_correction(x @ quantized.T, correction))
    assert torch.allclose(std_corr, std, rtol=1e-6)
    assert torch.allclose(mean_corr, mean, rtol=1e-6, atol=1e-6 * float(std.mean()))
    assert not correction.starved and correction.flat_channels == 0
    assert correction.scale.dtype == correction.shift.dtype == torch.float64
    assert correction.scale.shape == correction.shift.shape == (OC,)


def test_relative_errors_equal_explicit_pass_and_drop():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x))
    y, y_hat = x @ weight.T, x @ quantized.T
    energy = float(y.square().sum())
    before = float((y_hat - y).square().sum()) / energy
    after = float((apply_correction(y_hat, correction) - y).square().sum()) / energy
    assert correction.error_before == pytest.approx(before, rel=1e-9)
    assert correction.error_after == pytest.approx(after, rel=1e-9)
    assert correction.error_after < correction.error_before


def test_mean_mode_fixes_only_the_mean():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x), mode="mean")
    assert torch.equal(correction.scale, torch.zeros(OC, dtype=torch.float64))
    mean, std = stats(x @ weight.T)
    mean_q, std_q = stats(x @ quantized.T)
    mean_corr, std_corr = stats(apply_correction(x @ quantized.T, correction))
    assert torch.allclose(mean_corr, mean, rtol=1e-9, atol=1e-9)
    assert torch.allclose(std_corr, std_q, rtol=1e-9)


def test_var_mode_fixes_only_the_spread():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x), mode="var")
    full = bcos_correction(weight, quantized, moments_of(x), mode="full")
    assert torch.equal(correction.scale, full.scale)  # the same scale as full; only the shift differs
    mean, std = stats(x @ weight.T)
    mean_q, _ = stats(x @ quantized.T)
    mean_corr, std_corr = stats(apply_correction(x @ quantized.T, correction))
    assert torch.allclose(std_corr, std, rtol=1e-9)
    assert torch.allclose(mean_corr, mean_q, rtol=1e-9, atol=1e-9)


def test_none_mode_is_identity():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x), mode="none")
    assert not correction.scale.any() and not correction.shift.any()
    assert correction.error_after == pytest.approx(correction.error_before, rel=1e-12)


def test_flat_channels_keep_scale_zero_without_nan():
    x = sample_inputs(0)
    weight, quantized = weights()
    quantized[3] = 0  # sigma(yh_3) = 0
    quantized[5] = 1e-12 * quantized[6]  # sigma(yh_5) far under 1e-6 of the mean sigma
    correction = bcos_correction(weight, quantized, moments_of(x))
    assert torch.isfinite(correction.scale).all() and torch.isfinite(correction.shift).all()
    assert correction.scale[3] == 0 and correction.scale[5] == 0
    assert correction.flat_channels == 2
    mean, _ = stats(x @ weight.T)
    mean_corr, _ = stats(apply_correction(x @ quantized.T, correction))
    assert torch.allclose(mean_corr[[3, 5]], mean[[3, 5]], rtol=1e-9, atol=1e-9)  # the mean is still fixed


def test_all_flat_matrix_has_no_nan():
    x = sample_inputs(0)
    weight, _ = weights()
    correction = bcos_correction(weight, torch.zeros_like(weight), moments_of(x))
    assert torch.isfinite(correction.scale).all() and torch.isfinite(correction.shift).all()
    assert correction.flat_channels == OC


def test_starved_experts_get_identity_and_a_flag():
    weight, quantized = weights()
    few = sample_inputs(0, n=5)
    correction = bcos_correction(weight, quantized, moments_of(few), min_tokens=16)
    assert correction.starved and not correction.scale.any() and not correction.shift.any()
    empty = input_moments(torch.zeros(IC), torch.zeros(IC, IC), 0)
    correction = bcos_correction(weight, quantized, empty, min_tokens=0)
    assert torch.isfinite(correction.scale).all() and torch.isfinite(correction.shift).all()
    assert correction.error_before is None and correction.error_after is None


def test_propagated_inputs_match_full_precision_statistics():
    x, x_quantized = sample_inputs(0), sample_inputs(7) * 1.1 + 0.05  # upstream drift
    weight, quantized = weights()
    correction = bcos_correction(weight, quantized, moments_of(x), moments_of(x_quantized))
    mean, std = stats(x @ weight.T)
    mean_corr, std_corr = stats(apply_correction(x_quantized @ quantized.T, correction))
    assert torch.allclose(std_corr, std, rtol=1e-6)
    assert torch.allclose(mean_corr, mean, rtol=1e-6, atol=1e-6 * float(std.mean()))
    assert correction.error_before is None


def test_float32_weights_and_bad_mode():
    x = sample_inputs(0)
    weight, quantized = weights()
    correction = bcos_correction(weight.float(), quantized.float(), moments_of(x))
    assert correction.scale.dtype == torch.float64
    with pytest.raises(KbvqError, match="mode"):
        bcos_correction(weight, quantized, moments_of(x), mode="both")


def test_float32_product_gives_the_float64_correction_to_1e5():
    """With float32 weights (the stage's) the one big product runs in float32 with float64 sums; scale and
    shift stay within 1e-5 (relative) of the float64 correction (`output_moments`, float64 throughout)."""
    from kbvq_cli.moments import OutputMoments

    generator = torch.Generator().manual_seed(7)
    dim = 256
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
    x = (torch.randn(6000, dim, generator=generator, dtype=torch.float64) @ mixing) * torch.exp(
        torch.randn(dim, generator=generator, dtype=torch.float64)) + 0.3
    weight = torch.randn(192, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
    quantized = 0.9 * weight + 0.1 * torch.randn(weight.shape, generator=generator, dtype=torch.float64) / dim ** 0.5
    moments = moments_of(x)
    fast = bcos_correction(weight.float(), quantized.float(), moments)
    full, shrunk = output_moments(weight.float().double(), moments), output_moments(quantized.float().double(), moments)
    ratio = full.std / shrunk.std
    reference_shift = full.mean - ratio * shrunk.mean
    assert ((1 + fast.scale - ratio).abs() / ratio).max() < 1e-5
    assert (fast.shift - reference_shift).abs().max() < 1e-5 * full.std.max()
    assert isinstance(full, OutputMoments)
