"""Storage and effective bits per weight (Table 8, docs/method.md §5), from pack's summary or the shard shapes.

Without a `pack` stage the bytes are what the packed model will hold, counted from the shapes the
stages saved: the shared basis and expert coefficients at 16 bits (as klt-svd stores them), the
indices at `b d` bits each (as packed, not as the int16 vq keeps), the codebooks and BCOS scale/shift
at 16 bits, and every parameter of the model that no vq unit quantizes at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.units import layer_unit
from kbvq_cli.packed.bitpack import packed_size
from kbvq_cli.packed.storage import projection_bits
from stages.report.data import RunView, unit_header

PARTS = ("shared_basis", "expert_coeffs", "indices", "codebooks", "scale_shift", "unquantized")
PART_LABELS = {"shared_basis": "shared basis (16-bit)", "expert_coeffs": "expert coefficients (16-bit)",
               "indices": "VQ indices", "codebooks": "codebooks (16-bit)", "scale_shift": "BCOS scale/shift (16-bit)",
               "group_scales": "group scales/zeros (RTN, GPTQ)", "unquantized": "unquantized layers (16-bit)"}


def part_label(part: str, origin: str) -> str:
    """A part's row label; pack keeps unquantized layers in its own dtype, which need not be 16-bit."""
    if part == "unquantized" and origin == "pack":
        return "unquantized layers (as packed)"
    return PART_LABELS.get(part, part.replace("_", " "))


@dataclass(frozen=True)
class Storage:
    """Bytes per part of the compressed model, and its effective bits per weight."""

    parts: dict[str, int]  # part (PARTS, and any other pack records) -> bytes, in display order
    expert_weights: int  # weights of the quantized expert matrices
    model_weights: int  # every parameter of the model
    bits_per_expert_weight: float  # (all parts but unquantized) * 8 / expert_weights
    bits_per_weight: float  # all parts * 8 / model_weights
    formula_bits_per_expert_weight: float  # docs/method.md §5 over the routed experts
    original_bytes: int  # shards: the model at 16 bits per parameter; pack: the original model files
    origin: str  # "pack" or "shards"
    bytes_on_disk: int | None = None  # pack only: the packed files' size
    bits_per_routed_expert_weight: float | None = None  # shards only: measured, comparable with the formula

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())


def storage_from_pack(summary: dict) -> Storage:
    """Storage as `kbvq pack` recorded it (`summary["storage"]`)."""
    storage = summary["storage"]
    recorded = storage["parts"]
    order = [part for part in PARTS if part in recorded] + sorted(part for part in recorded if part not in PARTS)
    parts = {part: int(recorded[part]) for part in order if part in PARTS or recorded[part]}
    return Storage(parts=parts,
                   expert_weights=int(storage["expert_weights"]), model_weights=int(storage["model_weights"]),
                   bits_per_expert_weight=float(storage["bits_per_expert_weight"]),
                   bits_per_weight=float(storage["bits_per_weight"]),
                   formula_bits_per_expert_weight=float(storage["formula_bits_per_expert_weight"]),
                   original_bytes=int(storage["original_bytes"]), origin="pack",
                   bytes_on_disk=int(storage["bytes_on_disk"]))


def _is_shared_expert(unit: str, key: str) -> bool:
    """Whether a shard entry belongs to the shared expert (the rest, stacked bases included, to the routed)."""
    return unit.endswith(".shared") or key.startswith("shared.") or ".shared_expert_coeffs" in key


def _klt_bytes(view: RunView) -> dict[str, int]:
    """Shared basis and expert coefficient bytes over every klt-svd unit, and the routed experts' share."""
    found = {"shared_basis": 0, "expert_coeffs": 0, "routed": 0}
    for unit in view.klt.stage_dir.unit_names():
        for key, info in unit_header(view.klt.stage_dir, unit).items():
            part = "shared_basis" if key.endswith(".shared_basis") else (
                "expert_coeffs" if key.endswith((".expert_coeffs", ".shared_expert_coeffs")) else None)
            if part is not None:
                found[part] += info.nbytes
                found["routed"] += 0 if _is_shared_expert(unit, key) else info.nbytes
    return found


def _code_size(header: dict, projection: str) -> tuple[int, int]:
    """(bits per code b d, vector length d) of one projection of a vq unit, from its codebook [2^(b d), d]
    (the settings' size, or the one a bit budget chose for the layer's projection)."""
    codewords, dim = header[f"{projection}.codebook"].shape
    return int(codewords).bit_length() - 1, int(dim)


def _vq_bytes(view: RunView) -> dict[str, int]:
    """Packed index bytes, codebook bytes and quantized weights over every vq unit; routed experts' share."""
    found = {"indices": 0, "codebooks": 0, "weights": 0, "routed": 0, "routed_weights": 0}
    stage_dir = view.stage("vq")
    for unit in stage_dir.unit_names():
        routed = not _is_shared_expert(unit, "")
        header = unit_header(stage_dir, unit)
        for key, info in header.items():
            width, dim = _code_size(header, key.split(".")[0])
            size = packed_size(info.numel, width) if key.endswith(".indices") else info.nbytes
            part = "indices" if key.endswith(".indices") else "codebooks"
            found[part] += size
            found["routed"] += size if routed else 0
            if part == "indices":
                found["weights"] += info.numel * dim
                found["routed_weights"] += info.numel * dim if routed else 0
    return found


def _bcos_bytes(view: RunView) -> dict[str, int]:
    """BCOS scale and shift bytes (0 without a bcos stage, or with mode none: an identity needs no storage),
    and the routed experts' share."""
    found = {"scale_shift": 0, "routed": 0}
    stage_dir = view.stage("bcos")
    if stage_dir is None or stage_dir.manifest["config"].get("mode") == "none":
        return found
    for unit in stage_dir.unit_names():
        for key, info in unit_header(stage_dir, unit).items():
            if key.endswith((".scale", ".shift")):
                found["scale_shift"] += info.nbytes
                found["routed"] += 0 if _is_shared_expert(unit, key) else info.nbytes
    return found


def formula_bits(view: RunView) -> tuple[int, int]:
    """(bits, weights) of docs/method.md §5 summed over MoE layers and projections of the routed experts.

    `n` = routed experts, `oc x ic` from expert 0's vq indices, `k` = the rank klt-svd chose (0 where a
    projection has no shared part). A part shared on its output side (`down: output`) stores a `k x oc`
    basis and `k x ic` coefficients, so its shared term is `16 k (oc + n ic)` instead of `16 k (ic + n oc)`.
    """
    total_bits = total_weights = 0
    vq_dir, experts = view.stage("vq"), view.source.num_experts
    for index in view.moe_layers():
        parts = view.klt.stage_dir.read_metadata(layer_unit(index)).get("parts", {})
        shapes = unit_header(vq_dir, f"{layer_unit(index)}.expert_000")
        for projection in PROJECTIONS:
            oc, columns = shapes[f"{projection}.indices"].shape
            width, dim = _code_size(shapes, projection)
            ic, part = columns * dim, parts.get(projection, {})
            rank = int(part.get("rank", 0))
            counted = projection_bits(experts, oc, ic, rank, width // dim, dim, side=part.get("side", "input"))
            total_bits += counted.total
            total_weights += counted.weights
    return total_bits, total_weights


def storage_from_shards(view: RunView) -> Storage:
    """Storage counted from the shapes in the klt-svd, vq and bcos shards and the model's headers."""
    klt, vq, bcos = _klt_bytes(view), _vq_bytes(view), _bcos_bytes(view)
    model_weights = view.model_parameters()
    parts = {"shared_basis": klt["shared_basis"], "expert_coeffs": klt["expert_coeffs"], "indices": vq["indices"],
             "codebooks": vq["codebooks"], "scale_shift": bcos["scale_shift"],
             "unquantized": 2 * (model_weights - vq["weights"])}
    quantized_bytes = sum(parts.values()) - parts["unquantized"]
    routed_bytes = klt["routed"] + vq["routed"] + bcos["routed"]
    formula_total, formula_weights = formula_bits(view)
    return Storage(parts=parts, expert_weights=vq["weights"], model_weights=model_weights,
                   bits_per_expert_weight=8 * quantized_bytes / vq["weights"],
                   bits_per_weight=8 * sum(parts.values()) / model_weights,
                   formula_bits_per_expert_weight=formula_total / formula_weights,
                   original_bytes=2 * model_weights, origin="shards",
                   bits_per_routed_expert_weight=8 * routed_bytes / max(vq["routed_weights"], 1))


def run_storage(view: RunView) -> Storage | None:
    """pack's storage when pack recorded it, else counted from the shards; None without a vq stage."""
    pack = view.stage("pack")
    if pack is not None and "storage" in pack.manifest.get("summary", {}):
        return storage_from_pack(pack.manifest["summary"])
    if view.stage("vq") is None:
        return None
    return storage_from_shards(view)
