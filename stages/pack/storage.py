"""What a packed model costs: bytes per part, measured from the tensors written, beside METHOD.md §5.

Measured bits count exactly the stored tensors (16-bit values, bit-packed indices with at most 7 bits
of padding per matrix); the formula counts `16 k (ic + n oc) + n oc ic b + n 2^(bd) d 16 + n 2 oc 16`
per group of matrices sharing a basis (`stages.pack.layout.formula_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages.pack.accounting import projection_bits
from stages.pack.layout import formula_groups

CATEGORIES = {"shared_basis": "shared_basis", "expert_coeffs": "expert_coeffs", "indices": "indices",
              "codebook": "codebooks", "scale": "scale_shift", "shift": "scale_shift",
              # RTN/GPTQ: integer codes count as indices; per-group scales and zeros as their own part.
              "codes": "indices", "qscale": "group_scales", "qzero": "group_scales", "group_index": "group_scales"}
PROJECTION_NAMES = ("gate", "up", "down", "gate_proj", "up_proj", "down_proj")
PART_ORDER = ("shared_basis", "expert_coeffs", "indices", "codebooks", "scale_shift", "group_scales",
              "nonexpert_quantized", "unquantized")


def category(name: str) -> str:
    """Which part of the storage a packed tensor belongs to ("unquantized" for copied weights)."""
    pieces = name.split(".")
    if pieces[-1].startswith("weight_"):  # codes, scale, zero of a quantized non-expert linear (kbvq nonexpert)
        return "nonexpert_quantized"
    if len(pieces) >= 2 and pieces[-1] in CATEGORIES and pieces[-2] in PROJECTION_NAMES:
        return CATEGORIES[pieces[-1]]
    return "unquantized"


def moe_layer_storage(tensors: dict, metadata: dict, vq_config: dict, corrected: bool) -> dict:
    """Bytes per part of one unit's tensors; for a quantized layer, its expert weights and formula bits."""
    parts = {name: 0 for name in PART_ORDER}
    for name, tensor in tensors.items():
        parts[category(name)] += tensor.numel() * tensor.element_size()
    storage = {"bytes": parts, "expert_weights": 0, "formula_bits": 0}
    if metadata.get("moe") and metadata.get("format") == "scalar":
        from stages.gptq.core import gptq_bits

        experts = _num_experts(tensors)
        for name, (oc, ic) in metadata["shapes"].items():
            total, weights = gptq_bits(oc, ic, metadata["bits"], metadata["group_size"])
            count = 1 if name.startswith("shared.") else experts
            storage["expert_weights"] += count * weights
            storage["formula_bits"] += count * total
    elif metadata.get("moe"):
        shapes = {key: tuple(value) for key, value in metadata["shapes"].items()}
        groups = formula_groups(shapes, metadata["parts"], _num_experts(tensors), metadata["shared_path"] is not None,
                                metadata["shared_stacked"])
        for group in groups:
            counted = projection_bits(group.n, group.oc, group.ic, group.rank, vq_config["bits"], vq_config["dim"],
                                      corrected=corrected, with_basis=group.with_basis, side=group.side)
            storage["expert_weights"] += counted.weights
            storage["formula_bits"] += counted.total
    return storage


def _num_experts(tensors: dict) -> int:
    return next(t.shape[0] for name, t in tensors.items()
                if name.endswith(("experts.gate.codebook", "experts.gate.qscale")))


@dataclass
class StorageTally:
    bytes: dict = field(default_factory=lambda: {name: 0 for name in PART_ORDER})
    expert_weights: int = 0
    formula_bits: int = 0

    @classmethod
    def from_units(cls, stage_dir) -> "StorageTally":
        tally = cls()
        for name in stage_dir.unit_names():
            storage = stage_dir.read_metadata(name)["storage"]
            for part, count in storage["bytes"].items():
                tally.bytes[part] += count
            tally.expert_weights += storage["expert_weights"]
            tally.formula_bits += storage["formula_bits"]
        return tally


def finish_storage(tally: StorageTally, pack_dir: Path, source) -> dict:
    quantized = sum(count for part, count in tally.bytes.items() if part not in ("unquantized", "nonexpert_quantized"))
    model_weights, _ = source.stored_totals()
    return {
        "parts": tally.bytes,
        "expert_weights": tally.expert_weights,
        "model_weights": model_weights,
        "bits_per_expert_weight": 8 * quantized / max(tally.expert_weights, 1),
        "formula_bits_per_expert_weight": tally.formula_bits / max(tally.expert_weights, 1),
        "bits_per_weight": 8 * sum(tally.bytes.values()) / max(model_weights, 1),
        "bytes_on_disk": sum(p.stat().st_size for p in Path(pack_dir).glob("*.safetensors")),
        "original_bytes": sum((source.path / f).stat().st_size for f in set(source.weight_map.values())),
    }


def print_storage(storage: dict, where: Path) -> None:
    from rich.table import Table

    from kbvq_cli.console import console

    table = Table(title=f"packed model {where}", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for part in PART_ORDER:
        table.add_row(part, f"{storage['parts'].get(part, 0):,}")
    console.print(table)
    console.print(
        f"bits per expert weight {storage['bits_per_expert_weight']:.4f} (formula "
        f"{storage['formula_bits_per_expert_weight']:.4f}); bits per weight, whole model "
        f"{storage['bits_per_weight']:.4f}; {storage['bytes_on_disk']:,} bytes on disk against "
        f"{storage['original_bytes']:,} for the original ({storage['bytes_on_disk'] / storage['original_bytes']:.1%})")
