"""The expert weight matrices of one MoE layer, as 2D `[oc, ic]` matrices by (projection, expert).

Routed experts come from the fused `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`;
the shared expert (Qwen1.5-MoE's `shared_expert`, DeepSeek-V2's `shared_experts`) from its three
`nn.Linear` weights. The shared expert's key is `SHARED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kbvq_cli.model_files import ModelSource

PROJECTIONS = ("gate", "up", "down")
SHARED = "shared"


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
        return list(range(self.num_experts)) + ([SHARED] if self.shared else [])


def layer_experts(source: ModelSource, index: int, dtype=torch.float32, device="cpu") -> LayerExperts | None:
    """The experts of decoder layer `index`, or None if it is a dense layer."""
    adapter = source.adapter
    state = source.layer_state_dict(index)
    key = f"{adapter.experts}.gate_up_proj"
    if key not in state:
        return None
    gate_up = state[key].to(device=device, dtype=dtype)
    half = gate_up.shape[1] // 2
    routed = {"gate": gate_up[:, :half], "up": gate_up[:, half:],
              "down": state[f"{adapter.experts}.down_proj"].to(device=device, dtype=dtype)}
    shared, shared_path = {}, None
    for path in adapter.shared_experts:
        if f"{path}.gate_proj.weight" in state:
            shared_path = path
            shared = {p: state[f"{path}.{p}_proj.weight"].to(device=device, dtype=dtype) for p in PROJECTIONS}
    return LayerExperts(routed, shared, shared_path)
