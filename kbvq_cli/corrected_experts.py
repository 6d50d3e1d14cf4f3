"""Expert modules that compute the quantized model: `(1 + scale) * (What x) + shift` per projection.

The BCOS scale folds into the rows of `What` and the shift becomes a bias, so a corrected expert is an
ordinary gated MLP with biases. `CorrectedExperts` replaces a layer's fused routed experts and is
called exactly as the original (`experts(hidden_states, top_k_index, top_k_weights)`), so the model's
own router and routing weights are untouched; the correction sits before the routing weight
multiplies the expert's output (docs/method.md §4).
"""

from __future__ import annotations

import torch
from torch import nn


def fold(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`(1 + scale)[:, None] * weight` for weight [..., oc, ic] and scale [..., oc] (None: unchanged)."""
    return weight if scale is None else weight * (1 + scale.to(weight.dtype)).unsqueeze(-1)


class CorrectedExperts(nn.Module):
    """Routed experts with per-expert biases. gate_up [E, 2I, H], gate_up_bias [E, 2I], down [E, H, I], down_bias [E, H]."""

    def __init__(self, gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                 down_bias: torch.Tensor, act_fn):
        super().__init__()
        self.num_experts = gate_up.shape[0]
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.gate_up_bias = nn.Parameter(gate_up_bias.to(gate_up.dtype), requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.down_bias = nn.Parameter(down_bias.to(down.dtype), requires_grad=False)
        self.act_fn = act_fn

    def intermediate(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The corrected `down` input of one expert: act(gate x + b_g) * (up x + b_u). x [T, H] -> [T, I]."""
        gate, up = nn.functional.linear(x, self.gate_up_proj[expert], self.gate_up_bias[expert]).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:  # some routers mark dropped slots with index == num_experts
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            h = self.intermediate(hidden_states[token_idx], expert)
            y = nn.functional.linear(h, self.down_proj[expert], self.down_bias[expert])
            output.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(output.dtype))
        return output


def corrected_linear(weight: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> nn.Linear:
    """An `nn.Linear` computing `(1 + scale) * (W x) + shift` (for shared experts and dense MLPs)."""
    oc, ic = weight.shape
    linear = nn.Linear(ic, oc, bias=shift is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(fold(weight, scale))
        if shift is not None:
            linear.bias.copy_(shift.to(weight.dtype))
    return linear.requires_grad_(False)
