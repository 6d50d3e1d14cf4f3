"""Read `bcos`'s units: the per-channel scale and shift of every expert projection (docs/method.md §4).

The unit schema, defined here and used by the stage that writes it and by every reader: one unit per MoE
layer (`kbvq_cli.units.layer_unit`) holding `P.scale` and `P.shift` [E, oc] for each projection `P`
(gate, up, down) and `shared.P.scale` / `shared.P.shift` [oc] for a shared expert, float16 like the
packed model; its metadata is `BcosLayerMeta`. At inference `y = (1 + scale) * (What x) + shift`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import SHARED, layer_unit

STAGE = "bcos"
STORE_DTYPE = torch.float16


@dataclass(frozen=True)
class Correction:
    """One projection's scale and shift: [E, oc] for the routed experts, [oc] for a shared expert."""

    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class BcosLayerUnit:
    routed: dict[str, Correction]  # projection -> [E, oc] scale and shift
    shared: dict[str, Correction]  # projection -> [oc]; empty without a shared expert

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for prefix, corrections in (("", self.routed), (f"{SHARED}.", self.shared)):
            for projection, correction in corrections.items():
                tensors[f"{prefix}{projection}.scale"] = correction.scale.to(STORE_DTYPE)
                tensors[f"{prefix}{projection}.shift"] = correction.shift.to(STORE_DTYPE)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "BcosLayerUnit":
        def corrections(prefix: str) -> dict[str, Correction]:
            return {p: Correction(tensors[f"{prefix}{p}.scale"], tensors[f"{prefix}{p}.shift"])
                    for p in PROJECTIONS if f"{prefix}{p}.scale" in tensors}

        return cls(corrections(""), corrections(f"{SHARED}."))

    def of(self, projection: str, expert) -> Correction:
        """One expert's correction ([oc] scale and shift)."""
        if expert == SHARED:
            return self.shared[projection]
        routed = self.routed[projection]
        return Correction(routed.scale[expert], routed.shift[expert])


@dataclass(frozen=True)
class BcosLayerMeta:
    """Experts routed too few tokens (kept the identity), channels too flat to rescale, and the mean
    relative output errors before and after the correction (closed form only; None with --propagate)."""

    layer: int
    starved: list[str]
    flat_channels: int
    error_before: float | None
    error_after: float | None

    @classmethod
    def from_json(cls, data: dict) -> "BcosLayerMeta":
        return cls(int(data["layer"]), list(data["starved"]), int(data["flat_channels"]), data["error_before"],
                   data["error_after"])

    def to_json(self) -> dict:
        return {"layer": self.layer, "starved": self.starved, "flat_channels": self.flat_channels,
                "error_before": self.error_before, "error_after": self.error_after}


class BcosCorrections:
    """A finished bcos stage. With mode none every correction is the identity and costs no storage."""

    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, STAGE)
        self.mode: str = self.stage_dir.manifest["config"]["mode"]

    @property
    def corrects(self) -> bool:
        return self.mode != "none"

    def layer(self, index: int, device: str = "cpu") -> BcosLayerUnit:
        return BcosLayerUnit.from_tensors(self.stage_dir.read_unit(layer_unit(index), device))

    def meta(self, index: int) -> BcosLayerMeta:
        return BcosLayerMeta.from_json(self.stage_dir.read_metadata(layer_unit(index)))
