"""The `(oc, ic)` of a model's expert matrices, read from its safetensors headers (no weight is loaded).

A stage can check a setting against the model's shapes when it starts, before hours of work, without
reading a layer. The experts of every MoE layer of the supported architectures share one shape, so
the first MoE layer answers for all.
"""

from __future__ import annotations

from kbvq_cli.experts import PROJECTIONS, SHARED
from kbvq_cli.model_files import ModelSource, safetensors_header


def _shape(source: ModelSource, name: str) -> tuple[int, ...]:
    return tuple(safetensors_header(source.path / source.weight_map[name])[name]["shape"])


def _disk_path(source: ModelSource, memory_path: str) -> str:
    """A module path inside a layer as the checkpoint names it (Mixtral's `mlp` is `block_sparse_moe`)."""
    adapter = source.adapter
    if memory_path.startswith(adapter.moe_block + "."):
        return adapter.disk_moe_block + memory_path[len(adapter.moe_block):]
    return memory_path


def expert_matrix_shapes(source: ModelSource) -> dict[str, tuple[int, int]]:
    """`{"gate": (oc, ic), "up": ..., "down": ...}` of the routed experts, plus `shared.gate`, `shared.up`,
    `shared.down` where the model has a shared expert; empty for a model without MoE layers."""
    adapter = source.adapter
    experts = _disk_path(source, adapter.experts)
    for index in sorted(source.layer_tensor_names):
        prefix = f"{adapter.layers_prefix}.{index}."
        per_expert = {projection: f"{prefix}{experts}.0.{disk}.weight"
                      for projection, disk in zip(PROJECTIONS, adapter.disk_expert_names)}
        fused = f"{prefix}{experts}.gate_up_proj"  # a checkpoint saved in transformers 5's fused layout
        if all(name in source.weight_map for name in per_expert.values()):
            shapes = {p: _shape(source, name) for p, name in per_expert.items()}
        elif fused in source.weight_map:
            _, double, hidden = _shape(source, fused)
            shapes = {"gate": (double // 2, hidden), "up": (double // 2, hidden),
                      "down": _shape(source, f"{prefix}{experts}.down_proj")[1:]}
        else:
            continue
        for path in adapter.shared_experts:
            names = {p: f"{prefix}{_disk_path(source, path)}.{p}_proj.weight" for p in PROJECTIONS}
            if all(name in source.weight_map for name in names.values()):
                shapes.update({f"{SHARED}.{p}": _shape(source, name) for p, name in names.items()})
        return {part: (int(shape[0]), int(shape[1])) for part, shape in shapes.items()}
    return {}
