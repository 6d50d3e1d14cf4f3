"""The reference modules of a packed model: every active expert dequantized whole, then one matmul.

The semantics the kernel-backed runtime modules (`kbvq_cli.packed.modules`) are tested against, and what
`kbvq pack --dense` folds into plain weights. Not for speed: each step widens an expert's codes to int32
(held so) and forms its dense `[oc, ic]` matrix in the compute dtype. Built from a pack by
`kbvq_cli.packed.reference_loader.load_reference`.

For each projection: `y = (1 + scale) * (expert_coeffs @ (shared_basis @ x) + dequant(indices, codebook) @ x) + shift`
(input side; output side `shared_basis^T @ (expert_coeffs @ x)`). `VqExperts` replaces a layer's fused
routed experts and is called like them (`experts(hidden_states, top_k_index, top_k_weights)`), so the
model's own router and routing weights are untouched. `VqLinear` replaces one `nn.Linear` of a shared
expert.
"""

from __future__ import annotations

import torch
from torch import nn

from kbvq_cli.packed.expert_layer import RoutedExperts
from kbvq_cli.scalar_quant import QuantizedLinear, dequantize


class VqProjection(nn.Module):
    """One projection of `n` experts. indices int32 [n, oc, ic/d], codebook [n, K, d], scale/shift [n, oc]
    or None, shared_basis [k, ic] (input side) or [k, oc] (output side) or None, expert_coeffs
    [n, oc, k] / [n, k, ic] or None."""

    def __init__(self, indices, codebook, scale=None, shift=None, shared_basis=None, expert_coeffs=None,
                 side: str = "input"):
        super().__init__()
        self.side = side
        self.register_buffer("indices", indices)
        self.register_buffer("codebook", codebook)
        for name, value in (("scale", scale), ("shift", shift), ("shared_basis", shared_basis),
                            ("expert_coeffs", expert_coeffs)):
            self.register_buffer(name, value)

    @property
    def num_experts(self) -> int:
        return self.indices.shape[0]

    def specific_weight(self, expert: int) -> torch.Tensor:
        """`dequant(indices, codebook)` [oc, ic] of one expert."""
        indices = self.indices[expert]
        return nn.functional.embedding(indices, self.codebook[expert]).reshape(indices.shape[0], -1)

    def dense_weight(self, expert: int) -> torch.Tensor:
        """`(1 + scale)[:, None] * What` [oc, ic]: the plain matrix (the shift has no place in it)."""
        weight = self.specific_weight(expert)
        if self.shared_basis is not None:
            coeffs = self.expert_coeffs[expert]
            weight = weight + (coeffs @ self.shared_basis if self.side == "input" else self.shared_basis.T @ coeffs)
        return weight if self.scale is None else weight * (1 + self.scale[expert]).unsqueeze(-1)

    def project_basis(self, x: torch.Tensor) -> torch.Tensor | None:
        """`shared_basis @ x` for input-side parts ([T, k]); computed once for all experts of a layer."""
        if self.shared_basis is None or self.side != "input":
            return None
        return x @ self.shared_basis.T

    def forward(self, x: torch.Tensor, expert: int, projected: torch.Tensor | None = None) -> torch.Tensor:
        y = x @ self.specific_weight(expert).T
        if self.shared_basis is not None:
            if self.side == "input":
                projected = self.project_basis(x) if projected is None else projected
                y = y + projected @ self.expert_coeffs[expert].T
            else:
                y = y + (x @ self.expert_coeffs[expert].T) @ self.shared_basis
        if self.scale is not None:
            y = y * (1 + self.scale[expert])
        if self.shift is not None:
            y = y + self.shift[expert]
        return y


class VqExperts(RoutedExperts):
    """Routed experts of one layer: gate, up and down `VqProjection`s and the model's activation."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        gate_basis, up_basis = self.gate.project_basis(hidden_states), self.up.project_basis(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # some routers mark dropped slots with index == num_experts
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            x = hidden_states[token_idx]
            gate = self.gate(x, expert, None if gate_basis is None else gate_basis[token_idx])
            up = self.up(x, expert, None if up_basis is None else up_basis[token_idx])
            y = self.down(self.act_fn(gate) * up, expert)
            output.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(output.dtype))
        return output


class VqLinear(nn.Module):
    """An `nn.Linear` replacement computing one matrix from its quantized parts (a shared-expert
    projection, or a non-expert linear quantized by `kbvq nonexpert`), with the original's bias if any."""

    def __init__(self, projection, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.projection = projection
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.projection(x.reshape(-1, shape[-1]), 0).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class ScalarProjection(nn.Module):
    """One projection of `n` experts quantized by RTN/GPTQ: codes uint8 [n, oc, ic], scale and zero
    [n, oc, G], group_index int32 [n, ic] or None; W = (codes - zero) * scale per column's group."""

    def __init__(self, codes, scale, zero, group_size: int, group_index=None, dtype=torch.float32):
        super().__init__()
        self.group_size, self.dtype = group_size, dtype  # scale/zero stay in their stored 16 bits
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("group_index", group_index)
        self.shift = None

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    def dense_weight(self, expert: int) -> torch.Tensor:
        index = None if self.group_index is None else self.group_index[expert]
        quantized = QuantizedLinear(self.codes[expert], self.scale[expert], self.zero[expert], self.group_size, index)
        return dequantize(quantized).to(self.dtype)

    def project_basis(self, x: torch.Tensor) -> None:
        return None

    def forward(self, x: torch.Tensor, expert: int, projected=None) -> torch.Tensor:
        return x @ self.dense_weight(expert).T
