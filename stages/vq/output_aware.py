"""Output-aware VQ (docs/method.md §3, "Output-aware codebooks"): fit the codebook and the assignment to the
output error `Tr(E C E^T)` instead of the weight error `||E||^2`.

`E = W - Q` for `W [oc, ic]` and its VQ approximation `Q`, `C [ic, ic]` the input second moment, damped
as GPTQ damps it (`C + damp * mean(diag C) * I`, so it is positive definite). Sub-vector `(o, g)` holds
columns `g d .. g d + d - 1` of row `o`.

- **Weighted k-means** (`objective: output`): Lloyd iterations under the block-diagonal part of `C`,
  `sum_{o,g} (w_og - c)^T C_gg (w_og - c)`, which is `Tr(E C E^T)` exactly when the inputs of different
  groups are uncorrelated. Assignment: the nearest codeword in the metric of the point's group.
  Update: `c_a = (sum_{(o,g) in a} C_gg)^-1 sum_{(o,g) in a} C_gg w_og`, the exact minimiser.
- **Least-squares refinement** (`refine_iters`): with the assignment fixed, `Q` is linear in the codebook,
  and `Tr(E C E^T)` is minimised in closed form under the full `C` by the normal equations
  `M c = r`, `M = sum_o S_o^T C S_o`, `r = sum_o S_o^T C w_o` (`S_o [ic, K d]` picks row `o`'s codewords),
  `M [K d, K d]`. Codewords no point uses keep their values. Alternated with an assignment (nearest in
  the block metric, or the error-feedback one, which sees all of `C`); the best codebook seen is kept.

Every sum is a deterministic float64 reduction (`cluster_sums`: no floating-point atomics): same bytes on
every run and device.
"""

from __future__ import annotations

import torch

from stages.vq.core import cluster_sums, to_subvectors



def damped(second_moment: torch.Tensor, damp: float) -> torch.Tensor:
    """`C + damp * mean(diag C) * I` in float64 (a dead input, `C_jj = 0`, gets weight `damp * mean` only)."""
    c = second_moment.double()
    c = (c + c.T) / 2
    return c + damp * float(c.diagonal().mean().clamp_min(1e-30)) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def group_metrics(second_moment: torch.Tensor, dim: int) -> torch.Tensor:
    """The `d x d` diagonal blocks `C_gg` of `C [ic, ic]`: float64 [ic / d, d, d]."""
    groups = second_moment.shape[0] // dim
    blocks = second_moment.double().reshape(groups, dim, groups, dim)
    return blocks[torch.arange(groups), :, torch.arange(groups), :]


def output_error_of(weight: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, c: torch.Tensor) -> float:
    """`Tr(E C E^T)` (float64) of `weight [oc, ic]` against `codebook [K, d]` at `indices [oc, ic/d]`."""
    error = weight.double() - codebook.double()[indices.long()].reshape(weight.shape)
    return float(((error @ c.double()) * error).sum())


def metric_assign(weight: torch.Tensor, codebook: torch.Tensor, metrics: torch.Tensor,
                  chunk: int = 64) -> torch.Tensor:
    """Indices int64 [oc, ic/d]: for each sub-vector the codeword nearest in its group's metric,
    `argmin_c (w - c)^T C_gg (w - c)` (the first on ties), in float64. `metrics [G, d, d]` from `group_metrics`."""
    oc, ic = weight.shape
    groups, dim = metrics.shape[0], metrics.shape[1]
    points = weight.double().reshape(oc, groups, dim).transpose(0, 1)  # [G, oc, d]
    codewords = codebook.double()
    indices = torch.empty(groups, oc, dtype=torch.int64, device=weight.device)
    for start in range(0, groups, chunk):
        part = slice(start, start + chunk)
        applied = torch.einsum("gkl,cl->gck", metrics[part], codewords)  # C_gg c: [g, K, d]
        quadratic = (applied * codewords).sum(-1)  # c^T C_gg c: [g, K]
        cross = torch.einsum("gok,gck->goc", points[part], applied)  # w^T C_gg c: [g, oc, K]
        indices[part] = (quadratic[:, None, :] - 2 * cross).argmin(-1)  # w^T C_gg w is the same for all c
    return indices.T.contiguous()


def metric_update(weight: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metrics: torch.Tensor
                  ) -> torch.Tensor:
    """The codebook (float64 [K, d]) minimising the block-metric error for fixed `indices`: per codeword
    `(sum C_gg)^-1 sum C_gg w`; a codeword without points keeps its value."""
    k, dim = codebook.shape
    oc = weight.shape[0]
    flat = indices.reshape(-1)
    per_point = metrics.repeat(oc, 1, 1)  # row-major sub-vectors: point (o, g) has metric g
    points = to_subvectors(weight.double(), dim)
    weighted = torch.einsum("nkl,nl->nk", per_point, points)
    sums, counts = cluster_sums(torch.cat([per_point.reshape(-1, dim * dim), weighted], 1), flat, k)
    result = codebook.double().clone()
    used = counts > 0
    if used.any():
        lhs, rhs = sums[used, :dim * dim].reshape(-1, dim, dim), sums[used, dim * dim:]
        result[used] = torch.linalg.solve(lhs, rhs.unsqueeze(-1)).squeeze(-1)
    return result


def weighted_kmeans(weight: torch.Tensor, codebook: torch.Tensor, metrics: torch.Tensor, iters: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations under the block metric from `codebook [K, d]` (e.g. the weight k-means one):
    (codebook float64 [K, d], indices int64 [oc, ic/d]); stops when an assignment repeats."""
    codebook = codebook.double()
    indices = metric_assign(weight, codebook, metrics)
    for _ in range(iters):
        codebook = metric_update(weight, codebook, indices, metrics)
        new_indices = metric_assign(weight, codebook, metrics)
        if torch.equal(new_indices, indices):
            break
        indices = new_indices
    return codebook, indices


def normal_equations(weight: torch.Tensor, indices: torch.Tensor, c: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`M` (float64 [K d, K d]) and `r` (float64 [K d]) of `Tr(E C E^T)` as a function of the codebook,
    for fixed `indices [oc, ic/d]` and `C [ic, ic]`. Cost `oc * ic^2`: every row adds its `C` blocks
    `C[g, h]` at codeword pair `(idx[o, g], idx[o, h])`."""
    oc, ic = weight.shape
    groups = indices.shape[1]
    dim = ic // groups
    blocks = c.double().reshape(groups, dim, groups, dim).permute(0, 2, 1, 3).reshape(groups * groups, dim * dim)
    total = torch.zeros(k * k, dim * dim, dtype=torch.float64, device=weight.device)
    rows_per_step = max(1, 2 ** 20 // (groups * groups))  # about 2^20 blocks (128 MB) per step
    for start in range(0, oc, rows_per_step):
        rows = indices[start:start + rows_per_step].long()  # [b, G]
        pairs = (rows[:, :, None] * k + rows[:, None, :]).reshape(-1)  # [b G G]
        values = blocks.repeat(rows.shape[0], 1)
        total += cluster_sums(values, pairs, k * k)[0]
    m = total.reshape(k, k, dim, dim).permute(0, 2, 1, 3).reshape(k * dim, k * dim)
    projected = (weight.double() @ c.double()).reshape(-1, dim)  # (C w_o) cut like the sub-vectors
    flat = indices.reshape(-1).long()
    r = cluster_sums(projected, flat, k)[0].reshape(-1)
    return m, r


def least_squares_codebook(weight: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                           c: torch.Tensor) -> torch.Tensor:
    """The codebook (float64 [K, d]) minimising `Tr(E C E^T)` for fixed `indices`, under the full `C`
    (positive definite: `damped`). Codewords no sub-vector uses keep their values."""
    k, dim = codebook.shape
    m, r = normal_equations(weight, indices, c, k)
    used = torch.bincount(indices.reshape(-1).long(), minlength=k) > 0
    unknowns = used.repeat_interleave(dim)
    result = codebook.double().clone().reshape(-1)
    result[unknowns] = torch.linalg.solve(m[unknowns][:, unknowns], r[unknowns])
    return result.reshape(k, dim)


def output_aware(settings) -> bool:
    """Whether the settings ask for any of this module's steps (the defaults, the paper's, do not)."""
    return settings.objective == "output" or settings.refine_iters > 0


def output_aware_codes(weight: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                       second_moment: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """From the weight k-means result (`codebook [K, d]`, `indices [oc, ic/d]`) of `weight [oc, ic]`: the
    weighted k-means (`objective: output`), then `refine_iters` rounds of least-squares codebook and
    re-assignment, keeping the pair of least `Tr(E C E^T)`. Each codebook is rounded to its stored dtype
    before the assignment, so the codes fit the values `pack` stores. -> (codebook float16, indices int64)."""
    from stages.vq.error_feedback import error_feedback_assign
    from stages.vq.reader import CODEBOOK_DTYPE

    c = damped(second_moment, settings.damp)
    dim = codebook.shape[1]
    if settings.objective == "output":
        metrics = group_metrics(c, dim)
    else:  # the weight error: identity metrics, the nearest codeword
        metrics = torch.eye(dim, dtype=torch.float64, device=weight.device).expand(weight.shape[1] // dim, dim, dim)

    def stored(values: torch.Tensor) -> torch.Tensor:
        return values.to(CODEBOOK_DTYPE).double()

    def assign(values: torch.Tensor) -> torch.Tensor:
        if settings.error_feedback:  # sees all of C, not only its diagonal blocks
            return error_feedback_assign(weight, values.float(), second_moment, settings.damp)
        return metric_assign(weight, values, metrics)

    codebook = stored(codebook)
    if settings.objective == "output":
        codebook = stored(weighted_kmeans(weight, codebook, metrics, settings.iters)[0])
    indices = assign(codebook)
    best = (output_error_of(weight, codebook, indices, c), codebook, indices)
    for _ in range(settings.refine_iters):
        codebook = stored(least_squares_codebook(weight, codebook, indices, c))
        # the new codebook with the codes it was fitted to (never worse, but for the float16 rounding),
        # then with the codes re-assigned to it (which may be worse in the full C): the best is kept
        for candidate in (indices, assign(codebook)):
            found = output_error_of(weight, codebook, candidate, c)
            if found < best[0]:
                best = (found, codebook, candidate)
        indices = candidate
    return best[1].to(CODEBOOK_DTYPE), best[2]
