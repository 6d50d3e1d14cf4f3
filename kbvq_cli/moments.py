"""Input and output moments of a linear map, from running sums: what BCOS and the report's drift figures share.

An input's mean `mu_x` and covariance `S_x` give the per-channel mean and spread of `y = W x` in closed
form (`mu(y) = W mu_x`, `sigma(y_j)^2 = w_j^T S_x w_j`), so nothing here touches tokens. Float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kbvq_cli.errors import KbvqError


@dataclass(frozen=True)
class InputMoments:
    """Mean [ic] and (population) covariance [ic, ic] of an input, float64, over `count` tokens."""

    mean: torch.Tensor
    covariance: torch.Tensor
    count: int


def input_moments(sum_x: torch.Tensor, sum_xxT: torch.Tensor, count: int | torch.Tensor) -> InputMoments:
    """Mean and covariance from running sums: `sum_x [ic]`, `sum_xxT [ic, ic]`, `count` tokens.

    Population covariance `sum_xxT / n - mu mu^T` (divisor n, as calibrate's sums imply); the choice of
    divisor cancels in `sigma(y)/sigma(yh)`. Zero tokens give zero moments (the expert is starved).
    """
    n = int(count)
    if n < 0:
        raise KbvqError(f"token count must be >= 0 (got {n})")
    mean = sum_x.double() / max(n, 1)
    second = sum_xxT.double() / max(n, 1)
    covariance = (second + second.T) / 2 - torch.outer(mean, mean)
    return InputMoments(mean, covariance, n)


@dataclass(frozen=True)
class OutputMoments:
    """Per-output-channel mean and standard deviation of `y = W x`, float64 [oc] each."""

    mean: torch.Tensor
    std: torch.Tensor


def output_moments(weight: torch.Tensor, moments: InputMoments) -> OutputMoments:
    """`mu = W mu_x`, `sigma_j = sqrt(w_j^T S_x w_j)` for weight [oc, ic] (any float dtype).

    `((W @ S) * W).sum(1)` is the diagonal of `W S W^T` without forming the `oc x oc` matrix.
    """
    weight64 = weight.double()
    variance = ((weight64 @ moments.covariance) * weight64).sum(1).clamp_min(0)
    return OutputMoments(weight64 @ moments.mean, variance.sqrt())
