"""The math of BCOS (docs/method.md §4): per-channel affine corrections in closed form from input moments.

For one expert and projection, with full-precision `y = W x` and quantized `yh = What x` over the
tokens routed to that expert, the corrected output is `y_corr = (1 + scale) * yh + shift` (Eq. 7/18),
applied on the projection's own output, before the activation (gate, up) and before the routing
weight (down). With `mu_x`, `S_x` the inputs' mean and covariance, `mu(y) = W mu_x` and
`var(y_j) = w_j^T S_x w_j`, so nothing here touches tokens. Results are float64 (the one `oc x ic x ic`
product is float32 with float64 sums, see `_joint_moments`);
functions follow the device of their inputs.

Modes (`--mode`, the four rows of the paper's Table 15):
- full: `scale = sigma(y)/sigma(yh) - 1`, `shift = mu(y) - (1 + scale) mu(yh)` (Eq. 8/24): mean and
  standard deviation of every channel match the full-precision output.
- mean: `scale = 0`, `shift = mu(y) - mu(yh)`: the mean matches, the spread stays the quantized one.
- var: `scale = sigma(y)/sigma(yh) - 1`, `shift = -scale * mu(yh)`, i.e.
  `y_corr = mu(yh) + (1 + scale)(yh - mu(yh))`: the spread about the quantized mean is rescaled to
  the full-precision one and the mean stays the quantized one. This is the variance half of `full`,
  the exact complement of `mean` (full = mean + var applied together). The other reading, `shift = 0`,
  would also move every channel's mean by `scale * mu(yh)`, mixing a mean change into the ablation.
- none: `scale = shift = 0` (identity; the no-BCOS ablations).

Guards: a channel whose `sigma(yh)` is at most `min_std_ratio` times the mean `sigma(yh)` of the
matrix keeps `scale = 0` (its ratio would be noise or a division by zero); an expert routed fewer
than `min_tokens` tokens keeps the identity and is flagged `starved`. Nothing returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.moments import InputMoments, OutputMoments, input_moments, output_moments

Mode = Literal["full", "mean", "var", "none"]
MODES = ("full", "mean", "var", "none")


@dataclass(frozen=True)
class BcosCorrection:
    """`y_corr = (1 + scale) * yh + shift` for one expert and projection.

    scale, shift: [oc] float64 (store in the model's 16-bit dtype; identity is scale = shift = 0).
    starved: fewer than `min_tokens` tokens were routed: identity correction, report it.
    flat_channels: channels whose `sigma(yh)` fell under the threshold and kept scale = 0.
    error_before, error_after: relative output MSE `sum_j E[(yh_j - y_j)^2] / sum_j E[y_j^2]` without and
        with the correction, on the calibration distribution; None where it is not defined (quantized
        inputs from another data pass, or no tokens at all).
    """

    scale: torch.Tensor
    shift: torch.Tensor
    starved: bool
    flat_channels: int
    error_before: float | None
    error_after: float | None


def apply_correction(output: torch.Tensor, correction: BcosCorrection) -> torch.Tensor:
    """`(1 + scale) * output + shift` over the last dim of `output [..., oc]`, in output's dtype."""
    scale = correction.scale.to(device=output.device, dtype=output.dtype)
    shift = correction.shift.to(device=output.device, dtype=output.dtype)
    return output * (1 + scale) + shift


def _affine(full: OutputMoments, quantized: OutputMoments, mode: Mode, min_std_ratio: float
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """scale, shift [oc] float64 and the number of flat channels, per the module docstring."""
    zeros = torch.zeros_like(full.mean)
    if mode == "none":
        return zeros, zeros.clone(), 0
    threshold = min_std_ratio * float(quantized.std.mean())
    flat = quantized.std <= threshold  # also catches sigma(yh) == 0 when every channel is flat
    ratio = full.std / torch.where(flat, torch.ones_like(quantized.std), quantized.std)
    scale = torch.where(flat, zeros, ratio - 1)
    if mode == "mean":
        return zeros, full.mean - quantized.mean, 0
    if mode == "var":
        return scale, -scale * quantized.mean, int(flat.sum())
    return scale, full.mean - (1 + scale) * quantized.mean, int(flat.sum())


@dataclass(frozen=True)
class _JointMoments:
    """Moments of `y = W x` and `yh = What x` over the same inputs, float64 [oc] each."""

    mean_y: torch.Tensor
    mean_yh: torch.Tensor
    var_y: torch.Tensor
    var_yh: torch.Tensor
    cov: torch.Tensor  # Cov(y_j, yh_j)


def product_dtype(weight: torch.Tensor, quantized_weight: torch.Tensor) -> torch.dtype:
    """The precision of the closed form's one product (`_joint_moments`): float64 if either weight is,
    else float32. A covariance given in it is used as is; one in float64 is cast to it."""
    return torch.float64 if torch.float64 in (weight.dtype, quantized_weight.dtype) else torch.float32


def _joint_moments(weight: torch.Tensor, quantized_weight: torch.Tensor, moments: InputMoments) -> _JointMoments:
    """All of `_JointMoments` from one product `[W; What] @ S_x` ([2 oc, ic]).

    The product, the only `oc x ic x ic` work, is taken in the weights' own precision (float64 weights:
    float64; the stage's float32 weights: float32) and its rows are summed against the weights in
    float64, as `kbvq_cli.output_error` does. In float32 each variance is within about 1e-6 (relative)
    of float64 (tests/test_bcos_core.py holds scale and shift to 1e-5), at 2x the speed on a CPU and up
    to 64x on a consumer GPU, where float64 would make BCOS hours of a Mixtral run.
    """
    dtype = product_dtype(weight, quantized_weight)
    full, quantized = weight.to(dtype), quantized_weight.to(dtype)
    oc = full.shape[0]
    product = torch.cat([full, quantized]) @ moments.covariance.to(dtype)
    rows = lambda a, b: (a * b).sum(1, dtype=torch.float64)  # noqa: E731
    return _JointMoments(weight.double() @ moments.mean, quantized_weight.double() @ moments.mean,
                         rows(product[:oc], full).clamp_min(0), rows(product[oc:], quantized).clamp_min(0),
                         rows(product[:oc], quantized))


def _relative_errors(joint: _JointMoments, scale: torch.Tensor, shift: torch.Tensor) -> tuple[float | None, float | None]:
    """Relative output MSE before and after the correction.

    Per channel `E[(a yh + b - y)^2] = a^2 Var(yh) - 2a Cov(y, yh) + Var(y) + (a mu(yh) + b - mu(y))^2`.
    """
    energy = float((joint.var_y + joint.mean_y.square()).sum())
    if energy <= 0:
        return None, None

    def mse(alpha: torch.Tensor, beta: torch.Tensor) -> float:
        spread = alpha.square() * joint.var_yh - 2 * alpha * joint.cov + joint.var_y
        return float((spread.clamp_min(0) + (alpha * joint.mean_yh + beta - joint.mean_y).square()).sum()) / energy

    return mse(torch.ones_like(scale), torch.zeros_like(shift)), mse(1 + scale, shift)


def bcos_correction(weight: torch.Tensor, quantized_weight: torch.Tensor, moments: InputMoments,
                    quantized_moments: InputMoments | None = None, *, mode: Mode = "full",
                    min_tokens: int = 16, min_std_ratio: float = 1e-6) -> BcosCorrection:
    """The BCOS correction of one expert's projection (docs/method.md §4).

    weight [oc, ic]: full precision `W`; quantized_weight [oc, ic]: `W_share + VQ(W_spec)`.
    moments: the expert's input moments (its routed tokens; all tokens for a shared expert).
    quantized_moments: for `--propagate`, the moments of the inputs the quantized model itself produces
        at this point; None = the same inputs on both sides (closed form, docs/method.md §4).
    """
    if mode not in MODES:
        raise KbvqError(f"bcos mode must be one of {', '.join(MODES)} (got {mode!r})")
    if weight.shape != quantized_weight.shape:
        raise KbvqError(f"weight {tuple(weight.shape)} and quantized weight {tuple(quantized_weight.shape)} differ")
    starved = moments.count < min_tokens or (quantized_moments is not None and quantized_moments.count < min_tokens)
    if quantized_moments is None:
        joint = _joint_moments(weight, quantized_weight, moments)
        full = OutputMoments(joint.mean_y, joint.var_y.sqrt())
        quantized = OutputMoments(joint.mean_yh, joint.var_yh.sqrt())
    else:
        joint = None
        full, quantized = output_moments(weight, moments), output_moments(quantized_weight, quantized_moments)
    if starved:
        scale, shift, flat = torch.zeros_like(full.mean), torch.zeros_like(full.mean), 0
    else:
        scale, shift, flat = _affine(full, quantized, mode, min_std_ratio)
    before, after = (None, None) if joint is None or moments.count == 0 else _relative_errors(joint, scale, shift)
    return BcosCorrection(scale, shift, starved, flat, before, after)
