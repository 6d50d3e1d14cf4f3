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
    """Mean [ic] (float64) and (population) covariance [ic, ic] of an input over `count` tokens. The
    covariance is float64, or float32 where `input_moments` was asked for it (closed-form BCOS on float32
    weights, whose one product is float32 anyway)."""

    mean: torch.Tensor
    covariance: torch.Tensor
    count: int


ROWS = 1024  # covariance rows computed per step: a few float64 [ROWS, ic] blocks (117 MB at Mixtral's 14336)


def input_moments(sum_x: torch.Tensor, sum_xxT: torch.Tensor, count: int | torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> InputMoments:
    """Mean and covariance from running sums: `sum_x [ic]`, `sum_xxT [ic, ic]`, `count` tokens.

    Population covariance `(sum_xxT + sum_xxT^T) / 2n - mu mu^T` (divisor n, as calibrate's sums imply);
    the choice of divisor cancels in `sigma(y)/sigma(yh)`. Zero tokens give zero moments (the expert is
    starved). Computed in float64 a block of rows at a time and stored in `dtype`: every entry is the
    same elementwise float64 expression as over the whole matrix, so a float32 covariance is bit-identical
    to the float64 one cast, and the only `ic x ic` tensor made is the result (a Mixtral down input's
    float64 temporaries were five of them, 8 GB).
    """
    n = int(count)
    if n < 0:
        raise KbvqError(f"token count must be >= 0 (got {n})")
    mean = sum_x.double() / max(n, 1)
    covariance = torch.empty(sum_xxT.shape, dtype=dtype, device=sum_xxT.device)
    for start in range(0, sum_xxT.shape[0], ROWS):
        stop = min(start + ROWS, sum_xxT.shape[0])
        rows = sum_xxT[start:stop].double() / max(n, 1)
        columns = sum_xxT[:, start:stop].T.double() / max(n, 1)  # rows start:stop of the transpose
        covariance[start:stop] = (rows + columns) / 2 - torch.outer(mean[start:stop], mean)
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
