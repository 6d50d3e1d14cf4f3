"""Read `gptq`'s units: each expert's scalar-quantized matrices (RTN or GPTQ), as the packed model holds them.

The unit schema, defined here and used by the stage that writes it and by every reader: one unit per
expert (`kbvq_cli.units.expert_unit`) holding per projection `P` one matrix in the layout of
`kbvq_cli.scalar_quant.stored_tensors` (`P.codes` uint8 [oc, ic], `P.scale`, `P.zero` float16 [oc, G],
`P.group_index` int32 [ic] with act_order); its metadata is `ScalarExpertMeta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.scalar_quant import QuantizedLinear, dequantize, from_stored, stored_tensors
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import expert_unit, unit_layer

STAGE = "gptq"


@dataclass(frozen=True)
class ScalarExpertUnit:
    """One expert's matrices: projection -> QuantizedLinear."""

    matrices: dict[str, QuantizedLinear]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t for p in PROJECTIONS for name, t in stored_tensors(self.matrices[p], p).items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], group_size: int) -> "ScalarExpertUnit":
        return cls({p: from_stored(tensors, p, group_size) for p in PROJECTIONS})

    def matrix(self, projection: str) -> torch.Tensor:
        """`(codes - zero) * scale` of one projection, float32 [oc, ic]."""
        return dequantize(self.matrices[projection])


@dataclass(frozen=True)
class ScalarExpertMeta:
    """Relative output error per projection, whether the pooled statistics stood in for the expert's own
    (`starved`), its routed tokens, and its storage bits over its weights."""

    layer: int
    expert: object
    output_error: dict[str, float]
    starved: bool
    tokens: int
    storage_bits: int
    weights: int

    @classmethod
    def from_json(cls, data: dict) -> "ScalarExpertMeta":
        return cls(int(data["layer"]), data["expert"], dict(data["output_error"]), bool(data["starved"]),
                   int(data["tokens"]), int(data["storage_bits"]), int(data["weights"]))

    def to_json(self) -> dict:
        return {"layer": self.layer, "expert": self.expert, "output_error": self.output_error,
                "starved": self.starved, "tokens": self.tokens, "storage_bits": self.storage_bits,
                "weights": self.weights}


class GptqCodes:
    """A finished gptq stage (every unit hash-checked as it is read)."""

    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, STAGE)
        config = self.stage_dir.manifest["config"]
        self.group_size: int = int(config["group_size"])
        self.method: str = config["method"]
        self.bits: int = int(config["bits"])

    def layers(self) -> list[int]:
        return sorted({unit_layer(name) for name in self.stage_dir.unit_names()})

    def has(self, layer: int, expert) -> bool:
        return self.stage_dir.has_unit(expert_unit(layer, expert))

    def expert(self, layer: int, expert, device: str = "cpu") -> ScalarExpertUnit:
        return ScalarExpertUnit.from_tensors(self.stage_dir.read_unit(expert_unit(layer, expert), device),
                                             self.group_size)

    def metadata(self, layer: int, expert) -> ScalarExpertMeta:
        return ScalarExpertMeta.from_json(self.stage_dir.read_metadata(expert_unit(layer, expert)))

    def matrix(self, layer: int, expert, projection: str, device: str = "cpu") -> torch.Tensor:
        """The quantized `projection` matrix of one expert, float32 [oc, ic]."""
        return self.expert(layer, expert, device).matrix(projection)
