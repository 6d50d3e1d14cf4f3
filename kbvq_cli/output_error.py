"""The output-error measure every quantizer reports: `Tr(E C E^T)`, the summed output MSE of a weight error.

With `C` the uncentred second moment of a matrix's inputs, `Tr(E C E^T) / N` is the mean squared error
of `y = W x` over the calibration tokens when `W` is replaced by `W - E` (docs/method.md §2).
"""

from __future__ import annotations

import torch


def output_error(error: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """`Tr(E C E^T)` (float64 scalar, exact) of an error `E [oc, ic]` under input second moment `C [ic, ic]`."""
    e = error.double()
    return ((e @ second_moment.double()) * e).sum()


def _fast_trace(error: torch.Tensor, second_moment32: torch.Tensor) -> torch.Tensor:
    """`Tr(E C E^T)` from a float32 product `E C` and a float64 sum of its rows against `E`.

    The product is the only `oc x ic x ic` work; in float32 its relative error is about 1e-6 (the
    tests hold it to 1e-5 of the float64 value), far below any difference a report shows, and it is
    2x faster on a CPU and 32x on a consumer GPU than float64."""
    e = error.float()
    return ((e @ second_moment32) * e).sum(dtype=torch.float64)


def relative_output_errors(weight: torch.Tensor, approxes: list[torch.Tensor], second_moment: torch.Tensor
                           ) -> list[float]:
    """`Tr(E C E^T) / Tr(W C W^T)` for `E = W - approx` of each approximation, the output energy
    `Tr(W C W^T)` computed once."""
    c32 = second_moment.float()
    energy = _fast_trace(weight, c32).clamp_min(1e-30)
    return [float(_fast_trace(weight - approx, c32) / energy) for approx in approxes]


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """`Tr(E C E^T) / Tr(W C W^T)` with `E = W - approx`: the output MSE relative to the output energy."""
    return relative_output_errors(weight, [approx], second_moment)[0]


def vq_output_errors(residual: torch.Tensor, approx: torch.Tensor, share: torch.Tensor | None,
                     share_factors: tuple[torch.Tensor, torch.Tensor] | None, second_moment: torch.Tensor
                     ) -> tuple[float, float]:
    """vq's two reported errors of `W = S + R` (S the shared part, R the residual VQ quantizes into
    `approx`): `Tr(R C R^T) / Tr(W C W^T)` and `Tr(E C E^T) / Tr(W C W^T)` for `E = R - approx`, from
    two `oc x ic x ic` float32 products (`R C` and `approx C`) instead of three.

    `E C = R C - approx C`, and the output energy expands as `Tr(R C R^T) + 2 Tr(R C S^T) + Tr(S C S^T)`,
    whose last term comes from the shared part's factors `S = left @ right` (`left [oc, k]`, `right
    [k, ic]`) as `<left^T left, right C right^T>` in float64 (k x k). residual, approx, share: [oc, ic];
    share and share_factors None when there is no shared part. Within 1e-5 of float64
    (tests/test_output_error.py).
    """
    c32 = second_moment.float()
    r32 = residual.float()
    rc = r32 @ c32
    residual_energy = (rc * r32).sum(dtype=torch.float64)
    error = r32 - approx.float()
    error_energy = ((rc - approx.float() @ c32) * error).sum(dtype=torch.float64)
    energy = residual_energy
    if share is not None:
        left, right = (factor.double() for factor in share_factors)
        shared_energy = ((left.T @ left) * (right @ second_moment.double() @ right.T)).sum()
        energy = energy + 2 * (rc * share.float()).sum(dtype=torch.float64) + shared_energy
    energy = energy.clamp_min(1e-30)
    return float(residual_energy / energy), float(error_energy / energy)
