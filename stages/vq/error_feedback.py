"""GPTQ-style error feedback for vector quantization (the GPTVQ baseline of the paper's Table 5).

With the codebook fixed (k-means on the matrix), the columns are visited in groups of `d` (one
sub-vector per row), left to right. Each row's current sub-vector goes to the codeword that adds the
least output error, and that error is spread over the columns not yet quantized through the inverse
Hessian, as GPTQ does for one column (Frantar et al. 2022; van Baalen et al. 2024 for vectors):

    U = chol(H^-1) upper,  g = the group's columns,  r = the columns after it
    j* = argmin_j || (w_g - c_j) U_gg^-1 ||^2          (the OBS error of the group)
    W_r -= (W_g - Q_g) U_gg^-1 U_gr

With H = I (no input correlation) nothing is propagated and the assignment is the nearest codeword.
"""

from __future__ import annotations

import torch

from kbvq_cli.scalar_quant import inverse_hessian_factor


def error_feedback_assign(weight: torch.Tensor, codebook: torch.Tensor, hessian: torch.Tensor,
                          damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """Indices int64 [oc, ic/d] of `weight [oc, ic]` into `codebook [K, d]` under the input second moment
    `hessian [ic, ic]` (any scale). Weight updates in float32, the inverse Hessian factor in float64."""
    oc, ic = weight.shape
    dim = codebook.shape[1]
    work = weight.float().clone()
    hessian = hessian.to(device=work.device, dtype=torch.float64).clone()
    dead = hessian.diagonal() == 0  # inputs never non-zero: any codeword is exact, nothing to propagate
    hessian.diagonal()[dead] = 1
    factor = inverse_hessian_factor(hessian, damp)
    codebook = codebook.float().to(work.device)
    indices = torch.empty(oc, ic // dim, dtype=torch.int64, device=work.device)
    block_size = max(dim, block_size - block_size % dim)
    for start in range(0, ic, block_size):
        end = min(start + block_size, ic)
        errors = torch.zeros(oc, end - start, device=work.device)
        for group in range(start, end, dim):
            columns = slice(group, group + dim)
            local = torch.linalg.inv(factor[columns, columns]).float()  # U_gg^-1 [d, d]
            current = work[:, columns]
            chosen = _nearest(current @ local, codebook @ local)
            indices[:, group // dim] = chosen
            error = (current - codebook[chosen]) @ local  # [oc, d]
            errors[:, group - start:group - start + dim] = error
            inside = slice(group + dim, end)
            work[:, inside] -= error @ factor[columns, inside].float()
        work[:, end:] -= errors @ factor[start:end, end:].float()
    return indices


def _nearest(points: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """argmin_j ||p - c_j||^2 for points [n, d], codewords [K, d], exact (float64 differences)."""
    best = None
    for chunk in torch.split(torch.arange(codewords.shape[0], device=points.device), 1024):
        diff = points.double()[:, None, :] - codewords[chunk].double()[None, :, :]
        distance = diff.pow(2).sum(-1)
        value, position = distance.min(1)
        if best is None:
            best_value, best = value, chunk[position]
        else:
            better = value < best_value
            best_value = torch.where(better, value, best_value)
            best = torch.where(better, chunk[position], best)
    return best
