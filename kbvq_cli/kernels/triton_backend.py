"""`triton` backend: CUDA kernels, one launch per phase for all experts of a layer.

Decode (few rows per expert): `_lut_kernel` writes `lut[r, j, c] = x[row r, j*d:(j+1)*d] . codebook[c]` for
every routed row r, then `_gemv_kernel` sums `lut[r, j, indices[o, j]]` over j; for codebooks too large for a
table (see `common.use_lut`) `_gemv_kernel` gathers codebook rows instead. Prefill: `_tile_matmul_kernel`
dequantizes a [BLOCK_N, BLOCK_K] tile of one expert's matrix in registers and feeds it to `tl.dot`.

To run these kernels on the CPU, set TRITON_INTERPRET=1 before `triton` itself is first imported: triton's
own `@jit` helpers (tl.sum, ...) are decorated then, so setting it later breaks the kernels. The tests run
their triton cases in a child process started with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kbvq_cli.kernels.common import Segment, use_lut

# Rows per expert up to which the LUT GEMV runs instead of the tensor-core tile matmul. A guess: not yet
# measured on a GPU (docs/kernels.md).
DECODE_MAX_ROWS = 8
LUT_BLOCK_ELEMENTS = 4096  # entries of the table one `_lut_kernel` program builds: BLOCK_J rows of K
BLOCK_J, BLOCK_O = 32, 64
BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 64


@triton.jit
def _lut_kernel(x_ptr, rows_ptr, experts_ptr, cb_ptr, lut_ptr, ic, groups,
                K: tl.constexpr, D: tl.constexpr, BLOCK_J: tl.constexpr):
    r = tl.program_id(0)
    row, expert = tl.load(rows_ptr + r), tl.load(experts_ptr + r)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.arange(0, K)
    acc = tl.zeros([BLOCK_J, K], dtype=tl.float32)
    for i in tl.static_range(D):
        xv = tl.load(x_ptr + row * ic + j * D + i, mask=j < groups, other=0.0).to(tl.float32)
        w = tl.load(cb_ptr + (expert * K + c) * D + i).to(tl.float32)
        acc += xv[:, None] * w[None, :]
    tl.store(lut_ptr + (r * groups + j[:, None]) * K + c[None, :], acc, mask=(j < groups)[:, None])


@triton.jit
def _gemv_kernel(x_ptr, rows_ptr, experts_ptr, codes_ptr, cb_ptr, lut_ptr, out_ptr, ic, oc, groups,
                 K: tl.constexpr, D: tl.constexpr, CODE_MASK: tl.constexpr, USE_LUT: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_J: tl.constexpr):
    r = tl.program_id(0)
    row, expert = tl.load(rows_ptr + r), tl.load(experts_ptr + r)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for j0 in range(0, groups, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = (o < oc)[:, None] & (j < groups)[None, :]
        # int16 codes sign-extend; the mask restores the unsigned value.
        code = tl.load(codes_ptr + (expert * oc + o[:, None]) * groups + j[None, :], mask=mask, other=0)
        code = code.to(tl.int32) & CODE_MASK
        if USE_LUT:
            acc += tl.sum(tl.load(lut_ptr + (r * groups + j[None, :]) * K + code, mask=mask, other=0.0), 1)
        else:
            for i in tl.static_range(D):
                w = tl.load(cb_ptr + (expert * K + code) * D + i, mask=mask, other=0.0).to(tl.float32)
                xv = tl.load(x_ptr + row * ic + j * D + i, mask=j < groups, other=0.0).to(tl.float32)
                acc += tl.sum(w * xv[None, :], 1)
    tl.store(out_ptr + row * oc + o, acc, mask=o < oc)


@triton.jit
def _tile_matmul_kernel(x_ptr, tiles_ptr, codes_ptr, cb_ptr, out_ptr, ic, oc, groups, K,
                        D: tl.constexpr, CODE_MASK: tl.constexpr, PRECISE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tiles_ptr + 3 * tile)
    start, end = tl.load(tiles_ptr + 3 * tile + 1), tl.load(tiles_ptr + 3 * tile + 2)
    m = start + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, ic, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * ic + k[None, :], mask=(m < end)[:, None] & (k < ic)[None, :], other=0.0)
        w_mask = (n < oc)[:, None] & (k < ic)[None, :]
        code = tl.load(codes_ptr + (expert * oc + n[:, None]) * groups + (k // D)[None, :], mask=w_mask, other=0)
        code = code.to(tl.int32) & CODE_MASK
        w = tl.load(cb_ptr + (expert * K + code) * D + (k % D)[None, :], mask=w_mask, other=0.0)
        if PRECISE:  # mixed or float32 inputs: full-precision float32 products
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # same 16-bit dtype: exact products on tensor cores, float32 sums
            acc += tl.dot(x, tl.trans(w))
    tl.store(out_ptr + m[:, None] * oc + n[None, :], acc, mask=(m < end)[:, None] & (n < oc)[None, :])


def _code_mask(indices: torch.Tensor) -> int:
    return 0xFF if indices.dtype == torch.uint8 else 0xFFFF


def decode_rows(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor, codebook: torch.Tensor,
                out: torch.Tensor, lut: bool | None = None) -> None:
    """Write the segments' rows of `out` [N, oc] float32 with the LUT GEMV (or the codebook gather when
    `lut` is False; `use_lut(K, oc)` decides by default). x [N, ic]; indices [n, oc, J]; codebook [n, K, d]."""
    _, oc, groups = indices.shape
    num_codes, d = codebook.shape[1:]
    lut = use_lut(num_codes, oc) and (num_codes & (num_codes - 1)) == 0 if lut is None else lut
    rows = torch.cat([torch.arange(start, end) for _, start, end in segments]).to(x.device)
    experts = torch.cat([torch.full((end - start,), e) for e, start, end in segments]).to(x.device)
    table = torch.empty(rows.numel() * groups * num_codes if lut else 1, device=x.device, dtype=torch.float32)
    if lut:
        block_j = max(2, min(16, LUT_BLOCK_ELEMENTS // num_codes))
        _lut_kernel[(rows.numel(), triton.cdiv(groups, block_j))](
            x, rows, experts, codebook, table, x.shape[1], groups, K=num_codes, D=d, BLOCK_J=block_j)
    _gemv_kernel[(rows.numel(), triton.cdiv(oc, BLOCK_O))](
        x, rows, experts, indices, codebook, table, out, x.shape[1], oc, groups, K=num_codes, D=d,
        CODE_MASK=_code_mask(indices), USE_LUT=lut, BLOCK_O=BLOCK_O, BLOCK_J=BLOCK_J)


def prefill_rows(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor, codebook: torch.Tensor,
                 out: torch.Tensor) -> None:
    """Write the segments' rows of `out` [N, oc] float32 with the tile-dequantize matmul, all experts in one
    launch: one program per (BLOCK_M rows of one expert, BLOCK_N outputs)."""
    _, oc, groups = indices.shape
    tiles = [(e, r, min(r + BLOCK_M, end)) for e, start, end in segments for r in range(start, end, BLOCK_M)]
    tiles = torch.tensor(tiles, dtype=torch.int64, device=x.device)
    # Same 16-bit dtypes go to tensor cores as they are; anything else in float32. bfloat16 off CUDA means
    # the interpreter, whose tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584): float32 there.
    precise = x.dtype != codebook.dtype or x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    _tile_matmul_kernel[(tiles.shape[0], triton.cdiv(oc, BLOCK_N))](
        x, tiles, indices, codebook, out, x.shape[1], oc, groups, codebook.shape[1], D=codebook.shape[2],
        CODE_MASK=_code_mask(indices), PRECISE=precise, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def experts_forward(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor,
                    codebook: torch.Tensor) -> torch.Tensor:
    """x [N, ic] float, indices [n, oc, J], codebook [n, K, d] -> [N, oc] float32 (rows of no segment are 0)."""
    x, indices, codebook = x.contiguous(), indices.contiguous(), codebook.contiguous()
    out = torch.zeros(x.shape[0], indices.shape[1], device=x.device, dtype=torch.float32)
    decode = [seg for seg in segments if seg[2] - seg[1] <= DECODE_MAX_ROWS]
    prefill = [seg for seg in segments if seg[2] - seg[1] > DECODE_MAX_ROWS]
    if decode:
        decode_rows(x, decode, indices, codebook, out)
    if prefill:
        prefill_rows(x, prefill, indices, codebook, out)
    return out
