"""The output-error measure every quantizer reports: `Tr(E C E^T)`, the summed output MSE of a weight error.

With `C` the uncentred second moment of a matrix's inputs, `Tr(E C E^T) / N` is the mean squared error
of `y = W x` over the calibration tokens when `W` is replaced by `W - E` (docs/method.md §2).
"""

from __future__ import annotations

import torch


def output_error(error: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """`Tr(E C E^T)` (float64 scalar) of an error `E [oc, ic]` under input second moment `C [ic, ic]`."""
    e = error.double()
    return ((e @ second_moment.double()) * e).sum()


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """`Tr(E C E^T) / Tr(W C W^T)` with `E = W - approx`: the output MSE relative to the output energy."""
    error = output_error(weight - approx, second_moment)
    return float(error / output_error(weight, second_moment).clamp_min(1e-30))
