"""The expert weight matrices of one MoE layer, as 2D `[oc, ic]` matrices by (projection, expert).

Routed experts come from the fused `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`;
the shared expert (Qwen1.5-MoE's `shared_expert`, DeepSeek-V2's `shared_experts`) from its three
`nn.Linear` weights. The shared expert's key is `SHARED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kbvq_cli.model_files import ModelSource
from kbvq_cli.units import SHARED, expert_ids

PROJECTIONS = ("gate", "up", "down")
__all__ = ["PROJECTIONS", "SHARED", "LayerExperts", "layer_experts", "routed_tokens"]


@dataclass
class LayerExperts:
    routed: dict[str, torch.Tensor]  # projection -> [E, oc, ic]
    shared: dict[str, torch.Tensor]  # projection -> [oc, ic]; empty when the layer has no shared expert
    shared_path: str | None

    @property
    def num_experts(self) -> int:
        return int(self.routed["gate"].shape[0])

    def matrix(self, projection: str, expert) -> torch.Tensor:
        return self.shared[projection] if expert == SHARED else self.routed[projection][expert]

    def expert_ids(self) -> list:
        return expert_ids(self.num_experts, bool(self.shared))

    def parameters(self, expert) -> int:
        """The weight count of one expert (its three projections): its work estimate under torchrun."""
        return sum(self.matrix(projection, expert).numel() for projection in PROJECTIONS)


def layer_experts(source: ModelSource, index: int, dtype=torch.float32, device="cpu") -> LayerExperts | None:
    """The experts of decoder layer `index`, or None if it is a dense layer."""
    adapter = source.adapter
    state = source.layer_state_dict(index, expert_dtype=dtype)  # fused straight into `dtype`
    key = f"{adapter.experts}.gate_up_proj"
    if key not in state:
        return None
    gate_up = state.pop(key).to(device=device)
    half = gate_up.shape[1] // 2
    routed = {"gate": gate_up[:, :half], "up": gate_up[:, half:],
              "down": state.pop(f"{adapter.experts}.down_proj").to(device=device)}
    shared, shared_path = {}, None
    for path in adapter.shared_experts:
        if f"{path}.gate_proj.weight" in state:
            shared_path = path
            shared = {p: state[f"{path}.{p}_proj.weight"].to(device=device, dtype=dtype) for p in PROJECTIONS}
    return LayerExperts(routed, shared, shared_path)


def routed_tokens(top_k_index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Token indices routed to each expert, ascending. top_k_index [T, k] int -> E tensors of int64."""
    token_of = torch.arange(top_k_index.shape[0], device=top_k_index.device).repeat_interleave(top_k_index.shape[1])
    flat = top_k_index.reshape(-1)
    valid = flat < num_experts  # some routers mark dropped slots with index == num_experts
    flat, token_of = flat[valid], token_of[valid]
    order = torch.argsort(flat * top_k_index.shape[0] + token_of)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return list(torch.split(token_of[order], counts))
