"""Read `calibrate`'s shards for later stages: moments by consumer name, resolving shared inputs.

The shard schema (written by `stages.calibrate.collector`, read only here): per input space `S`,
`moments.S.sum_x`, `moments.S.sum_xxT`, `moments.S.count`; per-expert `experts.gate_up.*` and
`experts.down.*` (sum_x [E, D], sum_xxT [E, D, D] when kept, count [E]) and
`experts.down.pooled_sum_xxT`; `router.load`. The metadata (`CalibLayerMeta`) maps each consumer
("block", "linear.<path>") to the input space it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.finite import count_non_finite
from kbvq_cli.moments import InputMoments, input_moments
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit

BLOCK = "block"


@dataclass(frozen=True)
class Moments:
    """Sums over `count` tokens: `sum_x [D]`, `sum_xxT [D, D]` (either may carry a leading expert dim)."""

    sum_x: torch.Tensor
    sum_xxT: torch.Tensor | None
    count: torch.Tensor

    def second_moment(self) -> torch.Tensor:
        """`C_X = X^T X / (N - 1)` in float64 (docs/method.md §1): uncentred, as the output-MSE identity needs."""
        return self.sum_xxT.double() / max(int(self.count.sum()) - 1, 1)


@dataclass(frozen=True)
class CalibLayerMeta:
    layer: int
    moe: bool
    inputs: dict[str, str]  # consumer -> input space whose moments it reads

    @classmethod
    def from_json(cls, data: dict) -> "CalibLayerMeta":
        return cls(int(data["layer"]), bool(data.get("moe")), dict(data.get("inputs", {})))

    def to_json(self) -> dict:
        return {"layer": self.layer, "moe": self.moe, "inputs": dict(sorted(self.inputs.items()))}


class CalibrationLayer:
    def __init__(self, index: int, tensors: dict[str, torch.Tensor], meta: CalibLayerMeta):
        self.index = index
        self.tensors = tensors
        self.inputs: dict[str, str] = meta.inputs
        self.is_moe = meta.moe

    def input_moments(self, consumer: str) -> Moments:
        """Moments of the input of `consumer`: "block" or "linear.<module path in the layer>"."""
        if consumer not in self.inputs:
            raise KbvqError(f"calibration of layer {self.index} has no statistics for {consumer}; "
                            f"rerun `kbvq calibrate --restart` with this version")
        prefix = f"moments.{self.inputs[consumer]}"
        return Moments(self.tensors[f"{prefix}.sum_x"], self.tensors.get(f"{prefix}.sum_xxT"),
                       self.tensors[f"{prefix}.count"])

    def expert_moments(self, projection: str) -> Moments:
        """Per-expert moments of the `gate_up` or `down` input: sum_x [E, D], sum_xxT [E, D, D] or None."""
        prefix = f"experts.{projection}"
        return Moments(self.tensors[f"{prefix}.sum_x"], self.tensors.get(f"{prefix}.sum_xxT"),
                       self.tensors[f"{prefix}.count"])

    def pooled_down_second_moment(self) -> torch.Tensor:
        """Pooled second moment of the routed experts' `down` inputs, float64 [I, I]."""
        count = int(self.tensors["experts.down.count"].sum())
        return self.tensors["experts.down.pooled_sum_xxT"].double() / max(count - 1, 1)

    def expert_input(self, projection: str, expert, shared_path: str | None) -> Moments:
        """Moments of one expert's `projection` input over its routed tokens (all tokens for the shared
        expert, `expert == "shared"`); `sum_xxT` is None if calibrate kept no per-expert second moments."""
        if expert == "shared":
            consumer = "block" if projection != "down" else f"linear.{shared_path}.down_proj"
            return self.input_moments(consumer)
        stacked = self.expert_moments("gate_up" if projection != "down" else "down")
        second = stacked.sum_xxT[expert] if stacked.sum_xxT is not None else None
        return Moments(stacked.sum_x[expert], second, stacked.count[expert])

    def expert_input_moments(self, expert, projection: str, shared_path: str | None) -> InputMoments:
        """Mean and covariance of one expert's `projection` input over its routed tokens (closed-form BCOS)."""
        moments = self.expert_input(projection, expert, shared_path)
        if moments.sum_xxT is None:
            raise KbvqError("closed-form BCOS needs per-expert second moments; rerun `kbvq calibrate --restart` "
                            "with expert_second_moments: true in the recipe")
        return input_moments(moments.sum_x, moments.sum_xxT, moments.count.sum())

    @property
    def router_load(self) -> torch.Tensor:
        return self.tensors["router.load"]


class Calibration:
    """A finished calibrate stage, read layer by layer (each shard hash-checked as it is read)."""

    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, "calibrate")

    @property
    def num_layers(self) -> int:
        return len(self.stage_dir.unit_names())

    def layer(self, index: int, device: str = "cpu") -> CalibrationLayer:
        tensors = self.stage_dir.read_unit(layer_unit(index), device)
        _refuse_non_finite(index, tensors)
        return CalibrationLayer(index, tensors, self.layer_meta(index))

    def layer_meta(self, index: int) -> CalibLayerMeta:
        return CalibLayerMeta.from_json(self.stage_dir.read_metadata(layer_unit(index)))

    def layer_is_moe(self, index: int) -> bool:
        return self.layer_meta(index).moe

    def tokens(self) -> torch.Tensor:
        return self.stage_dir.read_aux("tokens")["input_ids"]

    @property
    def block_size(self) -> int:
        """Sequences per block of the data-parallel partition (`kbvq_cli.data_parallel`): calibrate's batch size."""
        return int(self.stage_dir.manifest["config"].get("batch_size", 1))


def _refuse_non_finite(index: int, tensors: dict[str, torch.Tensor]) -> None:
    """NaN/inf sums mean the model's activations overflowed in that layer: every later stage would turn
    them into NaN bases, codebooks and corrections, so they are stopped here, naming the layer."""
    bad = {name: count for name, count in ((name, count_non_finite(t)) for name, t in tensors.items()) if count}
    if bad:
        listed = ", ".join(f"{name} ({count} values)" for name, count in list(bad.items())[:3])
        raise KbvqError(f"the calibration statistics of layer {index} are not finite: NaN/inf in {listed}; the "
                        f"model's activations overflow there: check its weights, then rerun `kbvq calibrate "
                        f"--restart`")
