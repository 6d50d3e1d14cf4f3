"""The starved experts' fallback (`calibrate: {starved_fallback: all-tokens}`): a second pass over a layer.

Which experts the model's routing starves is known only once the layer has seen every calibration
token, so their all-token statistics come from a second run of the same layer on the same inputs, with
a hook that records, for those experts only, exactly what `routing: all` records for every expert (the
same products in the same batch order, so the same sums). The layer's output of that pass is dropped:
the next layer's input is the routed one of the first pass. The cost is one more forward pass of a
layer, paid only by layers with a starved expert.
"""

from __future__ import annotations

import torch

from kbvq_cli.streaming import module_at
from stages.calibrate.core import MomentSums, expert_intermediate


class FallbackCollector:
    """All-token `gate_up` and `down` sums for `experts` (a list of expert ids) of one layer.

    Has the accumulator attributes `stages.calibrate.parallel.accumulators` reads, so torchrun's
    block-ordered reduction applies to it as to the main collector."""

    def __init__(self, layer: torch.nn.Module, adapter, experts: list[int], second_moments: bool,
                 dtype: torch.dtype):
        self.experts = list(experts)
        module = module_at(layer, adapter.experts)
        self.device = next(layer.parameters()).device
        inter, hidden = module.down_proj.shape[2], module.gate_up_proj.shape[2]
        lead = (len(self.experts),)
        self.gate_up = MomentSums(hidden, self.device, lead, second_moments, dtype)
        self.down = MomentSums(inter, self.device, lead, second_moments, dtype)
        self.moments, self.pooled_down = {}, None
        self.load = torch.zeros(1, dtype=torch.int64)  # unused: the routed load is the first pass's
        self.handles = [module.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        x = hidden.reshape(-1, hidden.shape[-1]).float()
        every = torch.arange(x.shape[0], device=x.device)
        for slot, expert in enumerate(self.experts):
            x_expert = x[every]  # the copy `routing: all` takes, so that the products match it bit for bit
            self.gate_up.add(x_expert, slot)
            self.down.add(expert_intermediate(x_expert, module.gate_up_proj[expert].float(), module.act_fn), slot)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def collect_fallback(layer, adapter, experts: list[int], second_moments: bool, dtype: torch.dtype,
                     run_pass) -> FallbackCollector:
    """Run `run_pass(collector)` (the layer over its calibration inputs) with the fallback hook on."""
    collector = FallbackCollector(layer, adapter, experts, second_moments, dtype)
    try:
        run_pass(collector)
    finally:
        collector.close()
    return collector
