"""Forward hooks that record one decoder layer's calibration statistics while the real layer runs.

The routed experts' pre-hook receives exactly what the layer's own router chose (`top_k_index`), so
the statistics follow the model's routing without re-implementing any router. Every `nn.Linear` of
the layer other than the router (attention, shared experts, dense MLPs) has its input moments
recorded for GPTQ.

Many consumers read the same tensor (q/k/v share the normed hidden state; shared experts and routed
experts share the block input). Such inputs are summed once and the others recorded as aliases: on a
Qwen-sized layer this removes most of the stage's matmuls and disk. Identity is the tensor's memory
(pointer, shape, strides, version), and every tensor seen in a batch is held until the batch ends, so
a freed buffer reused for a different tensor can never be mistaken for the same input.
"""

from __future__ import annotations

import torch

from kbvq_cli.streaming import module_at
from stages.calibrate.reader import CalibLayerMeta, stored_second_moment, stored_sums
from kbvq_cli.experts import routed_tokens
from stages.calibrate.core import MomentSums, expert_intermediate

BLOCK = "block"


def _identity(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)


class LayerStatsCollector:
    def __init__(self, layer: torch.nn.Module, adapter, num_experts: int, expert_second_moments: bool,
                 routing: str = "model", layout: str = "exact"):
        self.num_experts = num_experts
        self.routing = routing  # "all": every expert's statistics over every token (CalibrateSettings.routing)
        self.load = torch.zeros(num_experts, dtype=torch.int64)  # routed slots per expert, whatever `routing`
        self.expert_second_moments = expert_second_moments
        self.layout = layout
        # The compact layout stores per-expert moments in 16 bits, so their running sums can be float32:
        # half the memory of the largest accumulators (Mixtral's down inputs: 6.6 GB instead of 13 GB
        # per layer), at ~1e-6 relative error against float64 sums (tests/test_calibrate_compact.py).
        expert_dtype = self.expert_dtype = torch.float32 if layout == "compact" else torch.float64
        self.device = next(layer.parameters()).device
        self.moments: dict[str, MomentSums] = {}  # canonical consumer -> sums
        self.alias: dict[str, str] = {}  # consumer -> canonical consumer
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}  # this batch's inputs, held alive
        self.gate_up = self.down = self.pooled_down = None
        self.fallback = None  # stages.calibrate.fallback.FallbackCollector: starved experts' all-token sums
        self.handles = [layer.register_forward_pre_hook(lambda *_: self._seen.clear()),
                        layer.register_forward_hook(lambda *_: self._seen.clear())]
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name != adapter.router:
                self.handles.append(module.register_forward_pre_hook(self._linear_hook(f"linear.{name}")))
        experts = module_at(layer, adapter.experts)
        if experts is not None:
            inter = experts.down_proj.shape[2]
            hidden = experts.gate_up_proj.shape[2]
            self.gate_up = MomentSums(hidden, self.device, (num_experts,), expert_second_moments, expert_dtype)
            self.down = MomentSums(inter, self.device, (num_experts,), expert_second_moments, expert_dtype)
            if not expert_second_moments:  # otherwise pooled from the per-expert sums at release (Mixtral's
                self.pooled_down = torch.zeros(inter, inter, dtype=torch.float64, device=self.device)  # 1.6 GB)
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook, with_kwargs=True))

    def _observe(self, consumer: str, x: torch.Tensor) -> None:
        """Add `x [T, D]` to `consumer`'s moments, unless it is the very tensor another consumer read."""
        key = _identity(x)
        if consumer not in self.alias:  # first batch: find out whom this consumer shares its input with
            self.alias[consumer] = self._seen[key][0] if key in self._seen else consumer
        canonical = self.alias[consumer]
        if canonical == consumer:
            if consumer not in self.moments:
                self.moments[consumer] = MomentSums(x.shape[-1], self.device)
            self.moments[consumer].add(x.float())
            self._seen[key] = (consumer, x)

    def _linear_hook(self, consumer: str):
        def hook(module, args):
            self._observe(consumer, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    def _experts_hook(self, module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]
        hidden, top_k_index = values[0], values[1]
        x2d = hidden.reshape(-1, hidden.shape[-1])
        self._observe(BLOCK, x2d)
        x = x2d.float()
        pooled = None  # this batch's pooled sum, added once: sums go batch by batch (any world size alike)
        routed = routed_tokens(top_k_index, self.num_experts)
        self.load += torch.tensor([tokens.numel() for tokens in routed], dtype=torch.int64)
        if self.routing == "all":  # the statistics see every token; the layer's output stays the routed one
            routed = [torch.arange(x.shape[0], device=x.device)] * self.num_experts
        for expert, tokens in enumerate(routed):
            if tokens.numel() == 0:
                continue
            x_expert = x[tokens]
            self.gate_up.add(x_expert, expert)
            h = expert_intermediate(x_expert, module.gate_up_proj[expert].float(), module.act_fn)
            self.down.add(h, expert)
            if not self.expert_second_moments:
                pooled = (h.T @ h).double() if pooled is None else pooled + (h.T @ h).double()
        if pooled is not None:
            self.pooled_down += pooled

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._seen.clear()

    def release_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's shard: names -> CPU tensors (second moments in `dtype`, counts int64).

        One-shot: each float64 accumulator is freed as soon as it is converted, which keeps the
        stage's peak memory near one copy of the statistics.
        """
        out = {}
        for consumer, sums in self.moments.items():
            out.update(self._release(sums, f"moments.{consumer}", dtype))
        if self.gate_up is not None:
            pooled = self.pooled_down
            if self.expert_second_moments:  # compact: summed slice by slice in float64 from float32 sums
                pooled = self.down.sum_xxT.sum(0) if self.layout == "exact" else self.down.pooled_second_moment()
            out.update(stored_second_moment("experts.down.pooled_sum_xxT", pooled, dtype, self.layout))
            del pooled
            self._apply_fallback()  # after the pooled sum, which stays the routed experts' real inputs
            out["router.load"] = self.load.clone()  # the same as gate_up.count under the model's routing
            out.update(self._release(self.gate_up, "experts.gate_up", dtype))
            out.update(self._release(self.down, "experts.down", dtype))
        return out

    def _apply_fallback(self) -> None:
        """Put the fallback's all-token sums in place of each starved expert's routed ones."""
        if self.fallback is None:
            return
        for mine, theirs in ((self.gate_up, self.fallback.gate_up), (self.down, self.fallback.down)):
            for slot, expert in enumerate(self.fallback.experts):
                mine.sum_x[expert] = theirs.sum_x[slot]
                mine.count[expert] = theirs.count[slot]
                if mine.sum_xxT is not None:
                    mine.sum_xxT[expert] = theirs.sum_xxT[slot].to(mine.sum_xxT.dtype)
        self.fallback = None

    def _release(self, sums: MomentSums, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if self.layout == "exact":
            return sums.release(prefix, dtype)
        out = stored_sums(prefix, sums.sum_x, sums.sum_xxT, sums.count, dtype, self.layout)
        sums.sum_xxT = None
        return out

    def metadata(self, index: int) -> CalibLayerMeta:
        return CalibLayerMeta(index, self.gate_up is not None, dict(self.alias), self.layout)

    def starved_experts(self, min_tokens: int) -> list[int]:
        if self.gate_up is None:
            return []
        return [e for e, count in enumerate(self.gate_up.count.tolist()) if count < min_tokens]
