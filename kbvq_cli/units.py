"""Names of the shards every per-layer and per-expert stage writes, and the experts of a layer: defined once.

A per-layer unit is `layer_NNN`; a per-expert unit is `layer_NNN.expert_EEE`, or `layer_NNN.shared` for a
layer's shared expert. The expert ids of a layer are its routed experts `0 .. E-1`, then `SHARED`.
"""

from __future__ import annotations

SHARED = "shared"


def layer_unit(index: int) -> str:
    """The unit name of decoder layer `index`."""
    return f"layer_{index:03d}"


def expert_unit(layer: int, expert) -> str:
    """The unit name of one expert (an int, or `SHARED`) of decoder layer `layer`."""
    return f"{layer_unit(layer)}.{SHARED}" if expert == SHARED else f"{layer_unit(layer)}.expert_{expert:03d}"


def unit_layer(name: str) -> int:
    """The decoder layer a unit name belongs to (`layer_012.expert_003` -> 12)."""
    return int(name.split(".")[0].removeprefix("layer_"))


def expert_ids(num_experts: int, has_shared: bool) -> list:
    """The experts of a layer in unit order: routed `0 .. num_experts-1`, then `SHARED` if there is one."""
    return list(range(num_experts)) + ([SHARED] if has_shared else [])
