"""A whole quantized projection around the VQ matmul, and a routed-experts layer built from three of them.

`y = (1 + scale) * (expert_coeffs @ (shared_basis @ x) + dequant(indices, codebook) @ x) + shift` per expert
(input side); on the output side the low-rank term is `shared_basis^T @ (expert_coeffs @ x)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from kbvq_cli.kernels import fused_decode
from kbvq_cli.kernels.api import resolve_backend, vq_experts_forward
from kbvq_cli.kernels.common import Segment, check_experts, segments_from_offsets


@dataclass(frozen=True)
class VqParts:
    """One projection of `n` experts as the packed model stores it.

    indices        [n, oc, ic/d] torch.uint8 | torch.int16 (unsigned 12/16-bit value)
    codebook       [n, K, d] float16 | bfloat16 (float32 accepted)
    scale, shift   [n, oc] or None (BCOS)
    shared_basis   [k, ic] on the input side, [k, oc] on the output side, or None
    expert_coeffs  [n, oc, k] on the input side, [n, k, ic] on the output side, or None
    """

    indices: torch.Tensor
    codebook: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    shared_basis: torch.Tensor | None = None
    expert_coeffs: torch.Tensor | None = None
    side: Literal["input", "output"] = "input"

    def __post_init__(self):
        n, oc, groups = self.indices.shape
        ic = groups * self.codebook.shape[-1]
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n, oc):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {(n, oc)}")
        if (self.shared_basis is None) != (self.expert_coeffs is None):
            raise ValueError("shared_basis and expert_coeffs come together or not at all")
        if self.side not in ("input", "output"):
            raise ValueError(f"side must be 'input' or 'output', got {self.side!r}")
        if self.shared_basis is not None:
            rank = self.shared_basis.shape[0]
            basis, coeffs = ((rank, ic), (n, oc, rank)) if self.side == "input" else ((rank, oc), (n, rank, ic))
            if tuple(self.shared_basis.shape) != basis or tuple(self.expert_coeffs.shape) != coeffs:
                raise ValueError(f"{self.side}-side low-rank parts have shapes {tuple(self.shared_basis.shape)} "
                                 f"and {tuple(self.expert_coeffs.shape)}, expected {basis} and {coeffs}")

    @property
    def num_experts(self) -> int:
        return self.indices.shape[0]

    def project_basis(self, x: torch.Tensor) -> torch.Tensor | None:
        """`shared_basis @ x` [T, k] float32 for input-side parts (None otherwise): computed once for the
        tokens of a layer and shared by all its experts."""
        if self.shared_basis is None or self.side != "input":
            return None
        return x.float() @ self.shared_basis.float().T


def _low_rank(x: torch.Tensor, parts: VqParts, segments: list[Segment],
              projected: torch.Tensor | None) -> torch.Tensor:
    """The low-rank term [N, oc] float32 of every expert's rows."""
    out = x.new_zeros(x.shape[0], parts.indices.shape[1], dtype=torch.float32)
    if parts.side == "input":
        projected = parts.project_basis(x) if projected is None else projected.float()
        for expert, start, end in segments:
            out[start:end] = projected[start:end] @ parts.expert_coeffs[expert].float().T
    else:
        basis = parts.shared_basis.float()
        for expert, start, end in segments:
            out[start:end] = (x[start:end].float() @ parts.expert_coeffs[expert].float().T) @ basis
    return out


def projection_forward(x: torch.Tensor, parts: VqParts, offsets: torch.Tensor | list[int] | None = None, *,
                       projected: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """The projection's output for rows sorted by expert.

    x          [N, ic] float16|bfloat16|float32
    offsets    int [n+1]: expert e owns rows offsets[e]:offsets[e+1]; None means one expert (n == 1) owns all
    projected  optional [N, k] `shared_basis @ x` of these rows (see VqParts.project_basis), to reuse it
    returns    [N, oc] in x's dtype, accumulated in float32
    """
    n = check_experts(x, parts.indices, parts.codebook)[0]
    offsets = [0, x.shape[0]] if offsets is None else offsets
    segments = segments_from_offsets(offsets, n, x.shape[0])
    if projected is None and resolve_backend(x, backend) == "cpu" and fused_decode.fits(segments):
        return fused_decode.projection(x, parts, segments).to(x.dtype)
    y = vq_experts_forward(x, offsets, parts.indices, parts.codebook, backend=backend)
    if parts.shared_basis is not None:
        y = y + _low_rank(x, parts, segments, projected)
    _scale_and_shift(y, parts, segments)
    return y.to(x.dtype)


def _scale_and_shift(y: torch.Tensor, parts: VqParts, segments: list[Segment]) -> None:
    """BCOS in place on y [N, oc] float32: `y = (1 + scale[e]) * y + shift[e]` on each expert's rows.

    A loop over segments rather than a per-row gather of scale and shift: decoding has a handful of
    segments, and the gather (repeat_interleave + two [N, oc] index copies) cost more than the matmul's
    bookkeeping around it (about 0.15 ms a call in the decode profile)."""
    for expert, start, end in segments:
        rows = y[start:end]
        if parts.scale is not None:
            rows.mul_(1 + parts.scale[expert].float())
        if parts.shift is not None:
            rows.add_(parts.shift[expert].float())


def group_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort a router's choices by expert.

    top_k_index [T, k] int: expert of each token's slot; values outside 0..num_experts-1 (dropped slots) are
    skipped. Returns token [N] int64 and slot [N] int64 of each sorted row, and offsets [num_experts+1] int64.
    """
    flat = top_k_index.reshape(-1)
    keep = (flat >= 0) & (flat < num_experts)
    order = torch.argsort(flat, stable=True)
    order = order[keep[order]]
    counts = torch.bincount(flat[keep], minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    top_k = top_k_index.shape[1]
    return order // top_k, order % top_k, offsets


def moe_experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        gate: VqParts, up: VqParts, down: VqParts, act_fn: Callable[[torch.Tensor], torch.Tensor],
                        *, backend: str | None = None) -> torch.Tensor:
    """Routed experts of one layer: `sum_slots weight * down(act(gate(x)) * up(x))`, all experts batched.

    hidden [T, H] float; top_k_index [T, k] int; top_k_weights [T, k] float -> [T, H] in hidden's dtype.
    Called like the model's own fused experts (and like `kbvq_cli.packed.reference.VqExperts`).
    """
    if resolve_backend(hidden, backend) == "cpu":
        output = fused_decode.moe(hidden, top_k_index, top_k_weights, gate, up, down, act_fn)
        if output is not None:
            return output
    token, slot, offsets = group_by_expert(top_k_index, gate.num_experts)
    x = hidden[token]
    gate_basis, up_basis = gate.project_basis(hidden), up.project_basis(hidden)
    gate_out = projection_forward(x, gate, offsets, backend=backend,
                                  projected=None if gate_basis is None else gate_basis[token])
    up_out = projection_forward(x, up, offsets, backend=backend,
                                projected=None if up_basis is None else up_basis[token])
    y = projection_forward(act_fn(gate_out) * up_out, down, offsets, backend=backend)
    output = torch.zeros_like(hidden)
    output.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(output.dtype))
    return output
