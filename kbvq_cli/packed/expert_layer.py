"""What every packed routed-experts module holds: a layer's gate, up and down projections and its activation.

The kernel-backed modules (`modules.py`) and the reference ones (`reference.py`) differ only in `forward`,
which each is called like the model's own fused experts: `(hidden_states, top_k_index, top_k_weights)`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


class RoutedExperts(nn.Module):
    """gate, up and down projections of all `num_experts` routed experts of one layer, and the model's act."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act_fn: Callable, num_experts: int):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.act_fn = act_fn
        self.num_experts = num_experts
