"""Statistics of expert outputs in closed form from calibration moments (no data pass), float64.

With `C` the uncentred second moment of an input `x` and `y = W x`:
- `E[y_i . y_j] = Tr(W_i C W_j^T)` for two matrices reading the same `x`, so the cosine similarity of
  two experts' outputs over the calibration tokens is `Tr(W_i C W_j^T) / sqrt(Tr(W_i C W_i^T) Tr(W_j C W_j^T))`
  (Fig. 2);
- per channel, `mean(y) = W mu_x` and `var(y_j) = w_j^T S_x w_j` (Fig. 3), the same identities BCOS uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kbvq_cli.moments import InputMoments, output_moments


def psd_root(second_moment: torch.Tensor) -> torch.Tensor:
    """`R [ic, ic]` float64 with `R R^T = C` for a symmetric PSD `C [ic, ic]` (negative rounding clamped to 0)."""
    c = second_moment.double()
    eigenvalues, eigenvectors = torch.linalg.eigh((c + c.T) / 2)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt()


def output_similarity(weights: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the outputs of `weights [E, oc, ic]` over inputs with second moment `C [ic, ic]`.

    Returns `[E, E]` float64; an expert whose output is identically zero gets similarity 0 with all.
    Memory: one float64 copy of the stack (`E oc ic` x 8 bytes).
    """
    mapped = (weights.double() @ psd_root(second_moment)).flatten(1)  # row i: W_i R, so <.,.> = Tr(W_i C W_j^T)
    gram = mapped @ mapped.T
    norms = gram.diagonal().sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    similarity = gram / safe[:, None] / safe[None, :]
    dead = norms <= 0
    similarity[dead, :] = 0
    similarity[:, dead] = 0
    return similarity


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square `[E, E]` matrix, flattened `[E (E - 1)]`."""
    mask = ~torch.eye(matrix.shape[0], dtype=torch.bool, device=matrix.device)
    return matrix[mask]


@dataclass(frozen=True)
class ChannelStats:
    """Per-output-channel mean and variance `[oc]` float64 of one projection's outputs."""

    mean: torch.Tensor
    variance: torch.Tensor


def pooled_channel_stats(weights: list[torch.Tensor], moments: list[InputMoments],
                         corrections: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None) -> ChannelStats:
    """Channel statistics of `y_e = W_e x` pooled over experts, each expert over its own routed tokens.

    weights: per expert `[oc, ic]`; moments: per expert input mean/covariance and token count;
    corrections: per expert `(scale, shift)` `[oc]` applied as `(1 + scale) y + shift` (BCOS), or None.
    The pool is the mixture of the (expert, token) pairs: mean = sum_e n_e mu_e / N and
    var = sum_e n_e (var_e + mu_e^2) / N - mean^2. Experts with no tokens contribute nothing.
    """
    corrections = corrections or [None] * len(weights)
    first_sum, second_sum, total = None, None, 0
    for weight, moment, correction in zip(weights, moments, corrections):
        if moment.count == 0:
            continue
        stats = output_moments(weight, moment)
        mean, variance = stats.mean, stats.std.square()
        if correction is not None:
            gain = 1 + correction[0].double()
            mean, variance = gain * mean + correction[1].double(), gain.square() * variance
        first = moment.count * mean
        second = moment.count * (variance + mean.square())
        first_sum = first if first_sum is None else first_sum + first
        second_sum = second if second_sum is None else second_sum + second
        total += moment.count
    if total == 0:
        zeros = torch.zeros(weights[0].shape[0], dtype=torch.float64)
        return ChannelStats(zeros, zeros.clone())
    mean = first_sum / total
    return ChannelStats(mean, (second_sum / total - mean.square()).clamp_min(0))


@dataclass(frozen=True)
class Drift:
    """How far a variant's channel statistics are from the full-precision ones (scalars)."""

    mean_abs_mean_shift: float  # mean over channels of |mean - mean_FP|
    relative_mean_shift: float  # that, divided by the mean over channels of the FP standard deviation
    mean_abs_log_variance_ratio: float  # mean over channels of |ln(var / var_FP)| (0 = spreads match)


def drift(stats: ChannelStats, reference: ChannelStats) -> Drift:
    shift = (stats.mean - reference.mean).abs().mean()
    scale = reference.variance.sqrt().mean().clamp_min(1e-300)
    tiny = 1e-300
    log_ratio = (stats.variance.clamp_min(tiny).log() - reference.variance.clamp_min(tiny).log()).abs().mean()
    return Drift(float(shift), float(shift / scale), float(log_ratio))
