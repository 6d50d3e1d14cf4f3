"""The runtime modules of a loaded packed model: expert projections computed by `kbvq_cli.kernels` from the
parts the pack stores, held in the pack's own compact format.

Every module is created on the meta device with one buffer per stored tensor, under the pack's tensor
name (`kbvq_cli.packed.layout`) and with its stored dtype and shape, so transformers' loader fills it with
the shard's tensor as it is: codebooks, bases, coefficients, scales and shifts stay 16-bit whatever the
compute dtype. `to_resident()` (after loading) turns the bit-packed `indices` into the kernels' layout,
`[n, oc, ic/d]` uint8 for up to 8-bit codes (a view of the loaded bytes), int16 for 9-16 bits (16: a view);
RTN/GPTQ codes stay bit-packed and are dequantized one expert at a time when used. No dense copy of an
expert matrix is kept.

- `VqProjection`: one VQ projection of `n` experts; called directly (n = 1) it is a shared expert's linear.
- `VqExperts`: a layer's routed experts, called like the fused experts it replaces,
  `experts(hidden_states, top_k_index, top_k_weights)`, so the model's router is untouched.
- `ScalarProjection`, `ScalarExperts`: the same for RTN/GPTQ codes, and quantized non-expert linears.

The reference semantics (each expert dequantized whole) are `kbvq_cli.packed.reference`; `KBVQ_KERNELS`
picks the kernels' backend (`reference` dequantizes whole too).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from kbvq_cli.kernels import VqParts, group_by_expert, moe_experts_forward, projection_forward
from kbvq_cli.packed.bitpack import unpack_rows
from kbvq_cli.packed.expert_layer import RoutedExperts
from kbvq_cli.scalar_quant import QuantizedLinear, dequantize

TensorSpec = tuple[torch.dtype, tuple[int, ...]]  # a stored tensor's dtype and shape
VQ_PARTS = ("indices", "codebook", "scale", "shift", "shared_basis", "expert_coeffs")
DECODE_EXPERTS = 4  # experts whose 12-bit codes are widened at a time on loading


class PackedTensors(nn.Module):
    """A module whose buffers are stored tensors: created empty on the meta device from their specs."""

    def __init__(self, specs: dict[str, TensorSpec]):
        super().__init__()
        for name, (dtype, shape) in specs.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def part(self, name: str) -> torch.Tensor | None:
        return self._buffers.get(name)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round float16 codebooks: stored parts follow the device only.
        stored = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, buffer in stored.items():
            if self._buffers[name].dtype != buffer.dtype:
                self._buffers[name] = buffer.to(self._buffers[name].device)
        return self


def _with_expert_dim(tensor: torch.Tensor | None, routed: bool) -> torch.Tensor | None:
    return tensor if tensor is None or routed else tensor.unsqueeze(0)


class VqProjection(PackedTensors):
    """One VQ projection of `n` experts (`routed`) or of one matrix (a shared expert's linear).

    Buffers as stored (routed / single): `indices` uint8 [n, bytes] / [bytes], bit-packed at `width` bits;
    `codebook` [n, K, d] / [K, d]; optional `scale`, `shift` [n, oc] / [oc]; `shared_basis` [k, ic] (input
    side) or [k, oc] (output side); `expert_coeffs` [n, oc, k] / [oc, k] (input) or [n, k, ic] / [k, ic]
    (output). A stacked shared expert's gate/up borrow the routed `shared_basis` (`borrowed_basis`).
    """

    def __init__(self, specs: dict[str, TensorSpec], shape: tuple[int, int], width: int, side: str,
                 routed: bool, borrowed_basis: Callable[[], torch.Tensor] | None = None):
        super().__init__(specs)
        self.out_features, self.in_features = shape
        self.width, self.side, self.routed = width, side, routed
        # A callable, not the routed module: a module attribute would be registered twice in the state dict.
        self.borrowed_basis = borrowed_basis

    def to_resident(self) -> None:
        """Loaded bit-packed indices -> `[n, oc, ic/d]` (or `[oc, ic/d]`) codes in the kernels' dtype."""
        groups = self.in_features // self.codebook.shape[-1]
        packed = self.indices if self.routed else self.indices.unsqueeze(0)
        count = self.out_features * groups
        if self.width in (8, 16):  # views of the loaded bytes
            codes = unpack_rows(packed, self.width, count)
        else:  # decoded a few experts at a time: the int32 temporaries stay small
            codes = torch.cat([unpack_rows(rows, self.width, count) for rows in packed.split(DECODE_EXPERTS)])
        codes = codes.reshape(-1, self.out_features, groups)
        self.indices = codes if self.routed else codes[0]

    def parts(self) -> VqParts:
        """The kernels' view of this projection (expert dim added for a single matrix; no copies)."""
        basis = self.part("shared_basis")
        if basis is None and self.borrowed_basis is not None:
            basis = self.borrowed_basis()
        expand = lambda name: _with_expert_dim(self.part(name), self.routed)  # noqa: E731
        coeffs = expand("expert_coeffs")
        return VqParts(expand("indices"), expand("codebook"), expand("scale"), expand("shift"),
                       basis if coeffs is not None else None, coeffs, self.side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As the `nn.Linear` it replaces (single matrix only): x [..., ic] -> [..., oc] in x's dtype."""
        flat = x.reshape(-1, x.shape[-1])
        return projection_forward(flat, self.parts()).reshape(*x.shape[:-1], self.out_features)


class VqExperts(RoutedExperts):
    """A layer's routed experts: gate, up and down `VqProjection`s of all `num_experts` and the model's act."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H]; top_k_index [T, k] (index == num_experts marks a dropped slot); top_k_weights
        [T, k] -> [T, H]: token-slots sorted by expert, one kernel call per projection for all experts."""
        return moe_experts_forward(hidden_states, top_k_index, top_k_weights, self.gate.parts(), self.up.parts(),
                                   self.down.parts(), self.act_fn)


class ScalarProjection(PackedTensors):
    """One RTN/GPTQ projection of `n` experts (`routed`) or one matrix, kept bit-packed.

    `names` maps the parts `codes` (uint8 [n, bytes] / [bytes], `bits` each), `qscale` and `qzero` (16-bit
    [n, oc, G] / [oc, G]) and optional `group_index` (int32 [n, ic] / [ic]) to the buffer names the pack
    uses here (a non-expert linear's are `weight_codes`, ...). `bias` is a quantized linear's own bias.
    """

    def __init__(self, specs: dict[str, TensorSpec], names: dict[str, str], shape: tuple[int, int], bits: int,
                 group_size: int, routed: bool, bias: TensorSpec | None = None):
        super().__init__(specs)
        self.names = names
        self.out_features, self.in_features = shape
        self.bits, self.group_size, self.routed = bits, group_size, routed
        if bias is not None:
            self.bias = nn.Parameter(torch.empty(bias[1], dtype=bias[0], device="meta"), requires_grad=False)
        else:
            self.bias = None

    def to_resident(self) -> None:
        """The codes stay bit-packed: nothing to convert."""

    def _expert(self, name: str, expert: int) -> torch.Tensor | None:
        tensor = self.part(self.names[name]) if name in self.names else None
        return tensor[expert] if tensor is not None and self.routed else tensor

    def dense_weight(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """`(codes - zero) * scale` of one expert (0 for a single matrix): [oc, ic] in `dtype`, made on use."""
        packed = self._expert("codes", expert)
        codes = unpack_rows(packed.unsqueeze(0), self.bits, self.out_features * self.in_features)
        quantized = QuantizedLinear(codes.reshape(self.out_features, self.in_features), self._expert("qscale", expert),
                                    self._expert("qzero", expert), self.group_size, self._expert("group_index", expert))
        return dequantize(quantized).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As the `nn.Linear` it replaces (single matrix only)."""
        y = x @ self.dense_weight(0, x.dtype).T
        return y if self.bias is None else y + self.bias


class ScalarExperts(RoutedExperts):
    """A layer's routed experts quantized by RTN/GPTQ: each routed expert's matrices dequantized when used."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        token, slot, offsets = group_by_expert(top_k_index, self.num_experts)
        bounds, dtype = offsets.tolist(), hidden_states.dtype
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            rows = slice(bounds[expert], bounds[expert + 1])
            if rows.start == rows.stop:
                continue
            x = hidden_states[token[rows]]
            gate = x @ self.gate.dense_weight(expert, dtype).T
            up = x @ self.up.dense_weight(expert, dtype).T
            y = (self.act_fn(gate) * up) @ self.down.dense_weight(expert, dtype).T
            output.index_add_(0, token[rows], (y * top_k_weights[token[rows], slot[rows], None]).to(dtype))
        return output
