"""Forward hooks that record one decoder layer's calibration statistics while the real layer runs.

The routed experts' pre-hook receives exactly what the layer's own router chose (`top_k_index`), so
the statistics follow the model's routing without re-implementing any router. Every other
`nn.Linear` of the layer (attention, shared experts, dense MLPs) gets its input moments recorded for
GPTQ. Hooks are removed in `close()`, which the stage calls in a `finally`.
"""

from __future__ import annotations

import torch

from kbvq_cli.streaming import module_at
from stages.calibrate.core import MomentSums, expert_intermediate, routed_tokens


class LayerStatsCollector:
    def __init__(self, layer: torch.nn.Module, adapter, num_experts: int, expert_second_moments: bool):
        self.adapter = adapter
        self.num_experts = num_experts
        self.expert_second_moments = expert_second_moments
        self.linear: dict[str, MomentSums] = {}
        self.block = self.gate_up = self.down = self.pooled_down = None
        self.handles = []
        device = next(layer.parameters()).device
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name != adapter.router:
                self.linear[name] = MomentSums(module.in_features, device)
                self.handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
        experts = module_at(layer, adapter.experts)
        if experts is not None:
            hidden, inter = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
            self.block = MomentSums(hidden, device)
            self.gate_up = MomentSums(hidden, device, (num_experts,), expert_second_moments)
            self.down = MomentSums(inter, device, (num_experts,), expert_second_moments)
            self.pooled_down = torch.zeros(inter, inter, dtype=torch.float64, device=device)
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _linear_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            self.linear[name].add(x.reshape(-1, x.shape[-1]).float())

        return hook

    def _experts_hook(self, module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
        hidden, top_k_index = values[0], values[1]
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        self.block.add(x)
        for expert, tokens in enumerate(routed_tokens(top_k_index, self.num_experts)):
            if tokens.numel() == 0:
                continue
            x_expert = x[tokens]
            self.gate_up.add(x_expert, expert)
            h = expert_intermediate(x_expert, module.gate_up_proj[expert].float(), module.act_fn)
            self.down.add(h, expert)
            if not self.expert_second_moments:
                self.pooled_down += (h.T @ h).double()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's shard: names -> CPU tensors (second moments in `dtype`, counts int64)."""
        out = {}
        for name, sums in self.linear.items():
            out.update(sums.tensors(f"linear.{name}", dtype))
        if self.block is not None:
            out.update(self.block.tensors("block", dtype))
            out.update(self.gate_up.tensors("experts.gate_up", dtype))
            out.update(self.down.tensors("experts.down", dtype))
            pooled = self.down.sum_xxT.sum(0) if self.expert_second_moments else self.pooled_down
            out["experts.down.pooled_sum_xxT"] = pooled.to(dtype)
            out["router.load"] = self.gate_up.count.clone()
        return {name: tensor.cpu() for name, tensor in out.items()}

    def starved_experts(self, min_tokens: int) -> list[int]:
        if self.gate_up is None:
            return []
        return [e for e, count in enumerate(self.gate_up.count.tolist()) if count < min_tokens]
