"""Read `gptq`'s units: each expert's scalar-quantized matrices (RTN or GPTQ), as the packed model holds them."""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.stage_dir import StageDir
from stages.gptq.core import QuantizedLinear, dequantize
from stages.vq.stage import unit_name


class GptqCodes:
    """A finished gptq stage (every unit hash-checked as it is read)."""

    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, "gptq")
        self.group_size: int = int(self.stage_dir.manifest["config"]["group_size"])
        self.method: str = self.stage_dir.manifest["config"]["method"]
        self.bits: int = int(self.stage_dir.manifest["config"]["bits"])

    def has(self, layer: int, expert) -> bool:
        return self.stage_dir.has_unit(unit_name(layer, expert))

    def expert(self, layer: int, expert, device: str = "cpu") -> dict[str, torch.Tensor]:
        """One expert's unit: `P.codes`, `P.scale`, `P.zero` (and `P.group_index`) for P in gate, up, down."""
        return self.stage_dir.read_unit(unit_name(layer, expert), device)

    def metadata(self, layer: int, expert) -> dict:
        """`output_error` per projection, `starved`, `tokens`, `storage_bits`, `weights`."""
        return self.stage_dir.read_metadata(unit_name(layer, expert))

    def quantized(self, unit: dict[str, torch.Tensor], projection: str) -> QuantizedLinear:
        return quantized_linear(unit, projection, self.group_size)

    def dequantized_matrix(self, unit: dict[str, torch.Tensor], projection: str) -> torch.Tensor:
        """`(codes - zero) * scale` of one projection of a unit from `expert()`: float32 [oc, ic]."""
        return dequantize(self.quantized(unit, projection))

    def matrix(self, layer: int, expert, projection: str, device: str = "cpu") -> torch.Tensor:
        """The quantized `projection` matrix of one expert, float32 [oc, ic]."""
        return self.dequantized_matrix(self.expert(layer, expert, device), projection)


def quantized_linear(unit: dict[str, torch.Tensor], projection: str, group_size: int) -> QuantizedLinear:
    """One projection of a unit as a QuantizedLinear. `group_size` is the stage's (its manifest config):
    without act_order a unit does not say which columns a group spans when `ic` is not a multiple of it."""
    return QuantizedLinear(unit[f"{projection}.codes"], unit[f"{projection}.scale"], unit[f"{projection}.zero"],
                           group_size, unit.get(f"{projection}.group_index"))


def dequantized_matrix(unit: dict[str, torch.Tensor], projection: str, group_size: int) -> torch.Tensor:
    """`(codes - zero) * scale` of one projection of a unit, float32 [oc, ic] (see `quantized_linear`)."""
    return dequantize(quantized_linear(unit, projection, group_size))
