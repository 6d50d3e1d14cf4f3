"""RTN and GPTQ scalar quantization of one weight matrix (the paper's Table 1 baselines).

Format of a quantized `W [oc, ic]`: `codes` uint8 [oc, ic] in `0 .. 2^bits - 1`, and per output channel
and group of input columns a `scale` and a `zero` point, float16 [oc, G]:

    W~[o, c] = (codes[o, c] - zero[o, g(c)]) * scale[o, g(c)]

Groups are `group_size` consecutive input columns (the last one may be shorter), `g(c) = c // group_size`;
`group_size = 0` means one group per output channel (G = 1). GPTQ with `act_order` forms its groups in
the order it quantizes the columns (descending diag(H)), so a group is no longer a run of consecutive
original columns: those results carry `group_index` int32 [ic], the group of every original column
(GPTQ's `g_idx`), and codes stay in the original column order. Nothing else changes.

The grid is GPTQ's reference quantizer: the range of a group is [min, max] widened to include 0, so the
zero point `round(-min / scale)` is an integer in the grid; symmetric grids use `[-max|w|, max|w|]` and
`zero = 2^(bits-1)`. Scales are rounded up to float16 before any weight is quantized, so the stored
values are exactly the ones the algorithms used and every weight is within half a step of the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kbvq_cli.errors import KbvqError

SCALE_DTYPE = torch.float16


@dataclass
class QuantizedLinear:
    codes: torch.Tensor  # uint8 [oc, ic]
    scale: torch.Tensor  # float16 [oc, G]
    zero: torch.Tensor  # float16 [oc, G], integer values
    group_size: int  # 0 = per output channel
    group_index: torch.Tensor | None = None  # int32 [ic], only for act_order with groups


def num_groups(ic: int, group_size: int) -> int:
    """G: scale/zero columns of a matrix with `ic` inputs (1 for per-channel)."""
    return 1 if group_size == 0 else math.ceil(ic / group_size)


def column_groups(q: QuantizedLinear) -> torch.Tensor:
    """The group of every input column, int64 [ic]."""
    ic = q.codes.shape[1]
    if q.group_index is not None:
        return q.group_index.long()
    step = q.group_size or ic
    return torch.arange(ic, device=q.codes.device) // step


def gptq_bits(oc: int, ic: int, bits: int, group_size: int) -> tuple[int, int]:
    """(total stored bits, weights) of one `oc x ic` matrix: `bits` per code plus a 16-bit scale and a
    16-bit zero per group (2 bits, groups of 128: 2.25 bits per weight). A `group_index` (act_order with
    groups) is not counted: it is a permutation a packed format keeps per layer, under 0.1 bit per weight."""
    return oc * ic * bits + oc * num_groups(ic, group_size) * 2 * 16, oc * ic


def grid(columns: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of `columns [oc, n]`: float32 [oc] holding float16-exact values."""
    maxq = 2 ** bits - 1
    zero_row = torch.zeros(columns.shape[0], dtype=columns.dtype, device=columns.device)
    low, high = torch.minimum(columns.min(1).values, zero_row), torch.maximum(columns.max(1).values, zero_row)
    if symmetric:
        high = torch.maximum(-low, high)
        low = -high
    flat = (low == 0) & (high == 0)  # an all-zero row: any grid reproduces it
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = _float16_at_least(((high - low) / maxq).clamp_min(torch.finfo(SCALE_DTYPE).tiny))
    if symmetric:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def _float16_at_least(value: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= each positive float32 `value`, as float32: rounding a scale down would
    leave the group's extreme weights more than half a step outside the grid."""
    rounded = value.to(SCALE_DTYPE)
    below = rounded.float() < value
    # positive float16s are ordered like their bit patterns: + 1 is the next one up
    rounded = torch.where(below, (rounded.view(torch.int16) + 1).view(SCALE_DTYPE), rounded)
    if not torch.isfinite(rounded).all():
        raise KbvqError("a weight group's range overflows a float16 scale; this model cannot be stored this way")
    return rounded.float()


def quantize_column(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round `values` (any shape broadcasting with scale/zero) to the grid: (codes float32, dequantized)."""
    codes = torch.clamp(torch.round(values / scale) + zero, 0, maxq)
    return codes, (codes - zero) * scale


def dequantize(q: QuantizedLinear) -> torch.Tensor:
    """`(codes - zero) * scale` per column's group: float32 [oc, ic], in the original column order."""
    groups = column_groups(q)
    scale, zero = q.scale.float()[:, groups], q.zero.float()[:, groups]
    return (q.codes.float() - zero) * scale


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedLinear:
    """Round to nearest, per output channel (`group_size = 0`) or per group of input columns.

    weight [oc, ic] (any float dtype; quantized in float32) -> QuantizedLinear on weight's device.
    """
    weight = weight.float()
    oc, ic = weight.shape
    step = group_size or ic
    codes = torch.empty(oc, ic, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, ic, step):
        block = weight[:, start:start + step]
        scale, zero = grid(block, bits, symmetric)
        codes[:, start:start + step] = quantize_column(block, scale[:, None], zero[:, None], 2 ** bits - 1)[0].to(
            torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedLinear(codes, torch.stack(scales, 1).to(SCALE_DTYPE), torch.stack(zeros, 1).to(SCALE_DTYPE),
                           group_size)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + damp * mean(diag H) * I)^-1`, computed in float64. hessian [ic, ic]
    is modified in place (damped); returns float64 [ic, ic]."""
    diagonal = hessian.diagonal()
    diagonal.add_(damp * float(diagonal.mean()))
    lower, failed = torch.linalg.cholesky_ex(hessian)
    if int(failed):
        raise KbvqError(f"the Hessian is not positive definite after damping {damp}; raise --damp (e.g. 0.1)")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, symmetric: bool = False) -> QuantizedLinear:
    """GPTQ (Frantar et al. 2022): quantize columns one by one, spreading each column's rounding error
    over the columns not yet quantized through the inverse Hessian, in lazy-batch blocks.

    weight [oc, ic]; hessian [ic, ic] the uncentred second moment of the layer's input (`X^T X / N`, its
    scale does not matter). Columns with `H_ii = 0` (inputs never non-zero) are dead: their weights are
    set to 0 and `H_ii` to 1. Weight updates run in float32, the inverse Hessian in float64; the result is
    deterministic on a given device. Returns QuantizedLinear in the original column order.
    """
    work = weight.float().clone()
    hessian = hessian.to(device=work.device, dtype=torch.float64).clone()
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1
    work[:, dead] = 0
    order = None
    if act_order:
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        work, hessian = work[:, order], hessian[order][:, order]
    factor = inverse_hessian_factor(hessian, damp).float()
    codes, scale, zero = _quantize_columns(work, factor, bits, group_size, block_size, symmetric)
    result = QuantizedLinear(codes, scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE), group_size)
    if order is not None:
        position = torch.argsort(order)  # where each original column was quantized
        result.codes = codes[:, position]
        if group_size:
            result.group_index = (position // group_size).to(torch.int32)
    return result


def quantize_scalar(weight: torch.Tensor, hessian: torch.Tensor, method: str, bits: int, group_size: int,
                    damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                    symmetric: bool = False) -> QuantizedLinear:
    """`quantize_gptq` or `quantize_rtn` by name (`method` "gptq" or "rtn"); RTN ignores the Hessian."""
    if method == "gptq":
        return quantize_gptq(weight, hessian, bits, group_size, damp, act_order, block_size, symmetric)
    return quantize_rtn(weight, bits, group_size, symmetric)


def _quantize_columns(work: torch.Tensor, factor: torch.Tensor, bits: int, group_size: int, block_size: int,
                      symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over `work [oc, ic]` (updated in place), `factor` the upper Cholesky factor of
    the inverse Hessian [ic, ic] float32, both in quantization order -> (codes uint8, scale, zero [oc, G])."""
    oc, ic = work.shape
    maxq = 2 ** bits - 1
    codes = torch.empty(oc, ic, dtype=torch.uint8, device=work.device)
    scale = torch.empty(oc, num_groups(ic, group_size), device=work.device)
    zero = torch.empty_like(scale)
    if not group_size:
        scale[:, 0], zero[:, 0] = grid(work, bits, symmetric)
    for start in range(0, ic, block_size):
        end = min(start + block_size, ic)
        block, errors = work[:, start:end].clone(), torch.zeros(oc, end - start, device=work.device)
        local = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            group = column // group_size if group_size else 0
            if group_size and column % group_size == 0:
                current = _group_weights(work, block, errors, factor, start, i, group_size)
                scale[:, group], zero[:, group] = grid(current, bits, symmetric)
            values = block[:, i]
            level, approx = quantize_column(values, scale[:, group], zero[:, group], maxq)
            codes[:, column] = level.to(torch.uint8)
            error = (values - approx) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    return codes, scale, zero


def _group_weights(work, block, errors, factor, start: int, i: int, group_size: int) -> torch.Tensor:
    """The current (error-updated) weights of the group starting at column `start + i`: its columns in
    this block, plus, when the group runs past the block, the later columns with this block's updates so
    far applied. (GPTQ's reference code reads them before the in-block updates when groups do not align
    with blocks; with aligned groups both are the same.)"""
    end = start + block.shape[1]
    stop = min(start + i + group_size, work.shape[1])
    inside = block[:, i:min(stop, end) - start]
    if stop <= end:
        return inside
    beyond = work[:, end:stop] - errors @ factor[start:end, end:stop]
    return torch.cat([inside, beyond], 1)


def stored_tensors(q: QuantizedLinear, key: str) -> dict[str, torch.Tensor]:
    """How a stage shard stores one quantized matrix under `key`: `key.codes`, `key.scale`, `key.zero`
    (and `key.group_index`). The gptq and nonexpert stages write it; their readers read it back."""
    tensors = {f"{key}.codes": q.codes, f"{key}.scale": q.scale, f"{key}.zero": q.zero}
    if q.group_index is not None:
        tensors[f"{key}.group_index"] = q.group_index
    return tensors


def from_stored(tensors: dict[str, torch.Tensor], key: str, group_size: int) -> QuantizedLinear:
    """The inverse of `stored_tensors`. `group_size` is the stage's (its manifest config): without
    act_order a unit does not say which columns a group spans when `ic` is not a multiple of it."""
    return QuantizedLinear(tensors[f"{key}.codes"], tensors[f"{key}.scale"], tensors[f"{key}.zero"], group_size,
                           tensors.get(f"{key}.group_index"))
