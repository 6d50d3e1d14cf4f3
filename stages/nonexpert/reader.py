"""Read `nonexpert`'s units: the RTN/GPTQ-quantized linear layers outside the experts.

The unit schema, defined here and used by the stage that writes it and by every reader: one unit per
decoder layer (`kbvq_cli.units.layer_unit`) holding, for each quantized linear at module path `P` inside
the layer, one matrix in the layout of `kbvq_cli.scalar_quant.stored_tensors`; its metadata
(`NonExpertLayerMeta`) records each linear's shape, relative output error and storage bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.scalar_quant import QuantizedLinear, from_stored, stored_tensors
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit

STAGE = "nonexpert"


@dataclass(frozen=True)
class LinearMeta:
    shape: tuple[int, int]
    output_error: float
    storage_bits: int
    weights: int

    @classmethod
    def from_json(cls, data: dict) -> "LinearMeta":
        return cls(tuple(data["shape"]), float(data["output_error"]), int(data["storage_bits"]), int(data["weights"]))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "output_error": self.output_error, "storage_bits": self.storage_bits,
                "weights": self.weights}


@dataclass(frozen=True)
class NonExpertLayerMeta:
    layer: int
    linears: dict[str, LinearMeta]  # module path inside the layer -> what was quantized

    @classmethod
    def from_json(cls, data: dict) -> "NonExpertLayerMeta":
        return cls(int(data["layer"]), {path: LinearMeta.from_json(m) for path, m in data["linears"].items()})

    def to_json(self) -> dict:
        return {"layer": self.layer, "linears": {path: meta.to_json() for path, meta in self.linears.items()}}


def layer_tensors(matrices: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """A unit's tensors: every linear's matrix under its module path."""
    return {name: t for path, q in matrices.items() for name, t in stored_tensors(q, path).items()}


class NonExpertCodes:
    """A finished nonexpert stage; `quantizes_anything` is False for method none (no units)."""

    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, STAGE)
        config = self.stage_dir.manifest["config"]
        self.bits, self.group_size = int(config["bits"]), int(config["group_size"])

    @property
    def quantizes_anything(self) -> bool:
        return bool(self.stage_dir.unit_names())

    def has(self, layer: int) -> bool:
        return self.stage_dir.has_unit(layer_unit(layer))

    def meta(self, layer: int) -> NonExpertLayerMeta:
        return NonExpertLayerMeta.from_json(self.stage_dir.read_metadata(layer_unit(layer)))

    def layer(self, layer: int) -> dict[str, QuantizedLinear]:
        """Module path -> its quantized matrix, for every quantized linear of the layer."""
        tensors = self.stage_dir.read_unit(layer_unit(layer))
        return {path: from_stored(tensors, path, self.group_size) for path in self.meta(layer).linears}
