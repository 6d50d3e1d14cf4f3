"""What a packed model costs, the one storage accounting of kbvq: the docs/method.md §5 formula (the paper's
Appendix A.5) and the bytes per part measured from the tensors written. `kbvq pack` and `kbvq report`
both count with these functions.

Per layer and projection, `n` experts of `oc x ic`, shared rank `k`, `b` bits, vector length `d` (the
projection's own where a bit budget chose code sizes per projection, `PackedUnitMeta.code_size`):
    bits = 16 k (ic + n oc)            shared basis + expert coefficients (16-bit)
         + n oc ic b                   indices (b*d bits per d weights)
         + n 2^(b d) d 16              codebooks (16-bit)
         + n 2 oc 16                   BCOS scale and shift (16-bit; absent without BCOS)
over `n oc ic` weights.

Measured bits count exactly the stored tensors (16-bit values, bit-packed indices with at most 7 bits
of padding per matrix); the formula counts `16 k (ic + n oc) + n oc ic b + n 2^(bd) d 16 + n 2 oc 16`
per group of matrices sharing a basis (`kbvq_cli.packed.layout.formula_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kbvq_cli.packed.layout import formula_groups
from kbvq_cli.packed.schema import SCALAR, PackedUnitMeta
from kbvq_cli.scalar_quant import gptq_bits


@dataclass(frozen=True)
class ProjectionBits:
    shared: int
    indices: int
    codebooks: int
    corrections: int
    weights: int

    @property
    def total(self) -> int:
        return self.shared + self.indices + self.codebooks + self.corrections

    @property
    def bits_per_weight(self) -> float:
        return self.total / self.weights


def projection_bits(n: int, oc: int, ic: int, rank: int, bits: int, dim: int,
                    corrected: bool = True, with_basis: bool = True, side: str = "input") -> ProjectionBits:
    """`with_basis=False` for matrices whose coefficients use another group's basis (a shared expert
    of another size stacked with the routed experts): only their `16 k n oc` coefficient bits count.
    `side="output"` for a part shared on its output side (`klt-svd --down output`): its basis is
    `k x oc` and its coefficients `k x ic`, so the shared term is `16 k (oc + n ic)`."""
    basis_width, coeff_width = (ic, oc) if side == "input" else (oc, ic)
    return ProjectionBits(
        shared=16 * rank * ((basis_width if with_basis else 0) + n * coeff_width),
        indices=n * oc * ic * bits,
        codebooks=n * (2 ** (bits * dim)) * dim * 16,
        corrections=n * 2 * oc * 16 if corrected else 0,
        weights=n * oc * ic,
    )


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


def unit_storage(tensors: dict, meta: PackedUnitMeta) -> dict:
    """Bytes per part of one packed unit's tensors; for a quantized layer, its expert weights and formula bits."""
    parts = {name: 0 for name in PART_ORDER}
    for name, tensor in tensors.items():
        parts[category(name)] += tensor.numel() * tensor.element_size()
    storage = {"bytes": parts, "expert_weights": 0, "formula_bits": 0}
    if not meta.moe:
        return storage
    experts = _num_experts(tensors)
    if meta.format == SCALAR:
        for name, (oc, ic) in meta.shapes.items():
            total, weights = gptq_bits(oc, ic, meta.bits, meta.group_size)
            count = 1 if name.startswith("shared.") else experts
            storage["expert_weights"] += count * weights
            storage["formula_bits"] += count * total
        return storage
    parts_meta = {name: {"side": part.side, "rank": part.rank} for name, part in meta.parts.items()}
    for group in formula_groups(meta.shapes, parts_meta, experts, meta.shared_path is not None, meta.shared_stacked):
        bits, dim = meta.code_size(group.projection)
        counted = projection_bits(group.n, group.oc, group.ic, group.rank, bits, dim,
                                  corrected=meta.corrected, with_basis=group.with_basis, side=group.side)
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
