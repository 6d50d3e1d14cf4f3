"""Read `calibrate`'s shards for later stages: moments by consumer name, resolving shared inputs.

The shard schema, defined here (the collector writes it through `stored_sums`; every consumer reads it
through `CalibrationLayer`): per input space `S`, `moments.S.sum_x`, `moments.S.count` and its second
moment; per-expert `experts.gate_up.*` and `experts.down.*` (sum_x [E, D], count [E], second moments
when kept) and the pooled down second moment; `router.load`. Second moments come in one of two layouts,
named by the shard's `CalibLayerMeta.moments`:

- `exact`: `*.sum_xxT` dense ([D, D], or [E, D, D] per expert) in `moments_dtype`;
- `compact` (default): `*.sum_xxT_upper` the upper triangle [D(D+1)/2] in `moments_dtype`, and per
  expert `*.variance [E, D]` float32 with `*.correlation [E, D(D-1)/2]` float16
  (`stages.calibrate.compact`): about a quarter of the bytes; BCOS and GPTQ match the exact layout's to
  about 1e-4 relative (tests/test_calibrate_compact.py).

The metadata (`CalibLayerMeta`) maps each consumer ("block", "linear.<path>") to the input space it reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.finite import count_non_finite
from kbvq_cli.moments import InputMoments, input_moments
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit
from stages.calibrate.compact import decode_sum_xxT, encode_covariance, pack_upper, unpack_upper

BLOCK = "block"
LAYOUTS = ("exact", "compact")


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
    moments: str = "exact"  # layout of the second moments: exact | compact (shards before it are exact)

    @classmethod
    def from_json(cls, data: dict) -> "CalibLayerMeta":
        return cls(int(data["layer"]), bool(data.get("moe")), dict(data.get("inputs", {})),
                   str(data.get("moments", "exact")))

    def to_json(self) -> dict:
        data = {"layer": self.layer, "moe": self.moe, "inputs": dict(sorted(self.inputs.items()))}
        if self.moments != "exact":  # exact shards keep the bytes they had before the compact layout
            data["moments"] = self.moments
        return data


def stored_second_moment(name: str, sum_xxT: torch.Tensor, dtype: torch.dtype, layout: str
                         ) -> dict[str, torch.Tensor]:
    """One second-moment sum [D, D] (or [E, D, D] exact) as stored: dense `name`, or `name_upper` packed."""
    if layout == "exact":
        return {name: sum_xxT.to(dtype).cpu()}
    return {f"{name}_upper": pack_upper(sum_xxT, dtype).cpu()}


def stored_sums(prefix: str, sum_x: torch.Tensor, sum_xxT: torch.Tensor | None, count: torch.Tensor,
                dtype: torch.dtype, layout: str) -> dict[str, torch.Tensor]:
    """The shard tensors of one set of sums, CPU. sum_x [*lead, D], sum_xxT [*lead, D, D] or None,
    count [*lead]; `lead` is () or (E,) (per expert: the compact layout's 16-bit correlations).

    Per-expert second moments are encoded one expert at a time, so the extra memory is one `D x D`
    float64 matrix whatever E is.
    """
    out = {f"{prefix}.sum_x": sum_x.to(dtype).cpu(), f"{prefix}.count": count.reshape(-1).cpu()}
    if sum_xxT is None:
        return out
    if layout == "exact" or sum_xxT.dim() == 2:
        out.update(stored_second_moment(f"{prefix}.sum_xxT", sum_xxT, dtype, layout))
    else:
        experts, dim = sum_xxT.shape[0], sum_xxT.shape[-1]
        variances = out[f"{prefix}.variance"] = torch.empty(experts, dim, dtype=torch.float32)
        correlations = out[f"{prefix}.correlation"] = torch.empty(experts, dim * (dim - 1) // 2, dtype=torch.float16)
        for e in range(experts):  # filled in place: no list of encoded experts beside the stacked result
            variances[e], correlations[e] = encode_covariance(sum_x[e], sum_xxT[e], int(count[e]))
    return out


def layer_bytes(spaces: list[int], experts: tuple[int, int, int] | None, layout: str, value_bytes: int = 4,
                expert_second_moments: bool = True) -> int:
    """Bytes of the tensors of one layer's shard (its safetensors header aside), by formula.

    `spaces`: the width of each distinct input space the layer records (`moments.*`); `experts`:
    (E, H, I) for a MoE layer; `value_bytes`: of `moments_dtype`. Pinned against measured shards by
    tests/test_calibrate_compact.py.
    """
    def second(dim: int) -> int:
        return (dim * dim if layout == "exact" else dim * (dim + 1) // 2) * value_bytes

    total = sum(dim * value_bytes + 8 + second(dim) for dim in spaces)
    if experts is None:
        return total
    num, hidden, inter = experts
    for dim in (hidden, inter):
        total += num * dim * value_bytes + num * 8
        if expert_second_moments:
            total += num * (dim * dim * value_bytes if layout == "exact" else dim * 4 + dim * (dim - 1))
    return total + second(inter) + num * 8  # pooled down second moment, router load


class CalibrationLayer:
    def __init__(self, index: int, tensors: dict[str, torch.Tensor], meta: CalibLayerMeta):
        self.index = index
        self.tensors = tensors
        self.inputs: dict[str, str] = meta.inputs
        self.is_moe = meta.moe
        self._decoded: tuple[tuple, torch.Tensor] | None = None  # the last expert decoded (gate and up share it)

    def _dense(self, name: str) -> torch.Tensor | None:
        """A single input space's second-moment sum `name`, dense [D, D], in either layout (None if not kept)."""
        if name in self.tensors:
            return self.tensors[name]
        packed = self.tensors.get(f"{name}_upper")
        if packed is None:
            return None
        dim = int(round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2))
        return unpack_upper(packed, dim)

    def without_expert_moments(self) -> "CalibrationLayer":
        """This layer without its per-expert second moments (most of a MoE shard: 1.6 of Mixtral's 2.2 GB),
        for a stage that reads only per-space and pooled moments: the rest is freed once `self` is dropped."""
        per_expert = {f"experts.{p}.{n}" for p in ("gate_up", "down") for n in ("sum_xxT", "variance", "correlation")}
        stripped = copy.copy(self)
        stripped.tensors = {name: value for name, value in self.tensors.items() if name not in per_expert}
        stripped._decoded = None
        return stripped

    @property
    def has_expert_second_moments(self) -> bool:
        return any(f"experts.down.{name}" in self.tensors for name in ("sum_xxT", "correlation"))

    def _expert_sum_xxT(self, prefix: str, expert: int) -> torch.Tensor | None:
        """One routed expert's second-moment sum [D, D] (float64 when decoded), or None if not kept."""
        if f"{prefix}.sum_xxT" in self.tensors:
            return self.tensors[f"{prefix}.sum_xxT"][expert]
        if f"{prefix}.correlation" not in self.tensors:
            return None
        key = (prefix, expert)
        if self._decoded is None or self._decoded[0] != key:
            self._decoded = None  # free the previous one before decoding the next
            self._decoded = (key, decode_sum_xxT(self.tensors[f"{prefix}.sum_x"][expert],
                                                 self.tensors[f"{prefix}.variance"][expert],
                                                 self.tensors[f"{prefix}.correlation"][expert],
                                                 int(self.tensors[f"{prefix}.count"][expert])))
        return self._decoded[1]

    def input_moments(self, consumer: str) -> Moments:
        """Moments of the input of `consumer`: "block" or "linear.<module path in the layer>"."""
        if consumer not in self.inputs:
            raise KbvqError(f"calibration of layer {self.index} has no statistics for {consumer}; "
                            f"rerun `kbvq calibrate --restart` with this version")
        prefix = f"moments.{self.inputs[consumer]}"
        return Moments(self.tensors[f"{prefix}.sum_x"], self._dense(f"{prefix}.sum_xxT"),
                       self.tensors[f"{prefix}.count"])

    def expert_moments(self, projection: str) -> Moments:
        """Per-expert moments of the `gate_up` or `down` input stacked: sum_x [E, D], sum_xxT [E, D, D] or
        None. Decodes every expert at once: for small layers; a stage reads one expert with `expert_input`."""
        prefix = f"experts.{projection}"
        count = self.tensors[f"{prefix}.count"]
        stacked = self.tensors.get(f"{prefix}.sum_xxT")
        if f"{prefix}.correlation" in self.tensors:
            stacked = torch.stack([self._expert_sum_xxT(prefix, e).clone() for e in range(len(count))])
        return Moments(self.tensors[f"{prefix}.sum_x"], stacked, count)

    def expert_counts(self, projection: str) -> torch.Tensor:
        """Tokens routed to each expert, int64 [E] (`gate_up` or `down`: the same counts)."""
        return self.tensors[f"experts.{projection}.count"]

    def pooled_down_second_moment(self) -> torch.Tensor:
        """Pooled second moment of the routed experts' `down` inputs, float64 [I, I]."""
        count = int(self.tensors["experts.down.count"].sum())
        return self._dense("experts.down.pooled_sum_xxT").double() / max(count - 1, 1)

    def expert_input(self, projection: str, expert, shared_path: str | None) -> Moments:
        """Moments of one expert's `projection` input over its routed tokens (all tokens for the shared
        expert, `expert == "shared"`); `sum_xxT` is None if calibrate kept no per-expert second moments."""
        if expert == "shared":
            consumer = "block" if projection != "down" else f"linear.{shared_path}.down_proj"
            return self.input_moments(consumer)
        prefix = "experts.gate_up" if projection != "down" else "experts.down"
        return Moments(self.tensors[f"{prefix}.sum_x"][expert], self._expert_sum_xxT(prefix, expert),
                       self.tensors[f"{prefix}.count"][expert])

    def expert_input_moments(self, expert, projection: str, shared_path: str | None,
                             dtype: torch.dtype = torch.float64) -> InputMoments:
        """Mean and covariance of one expert's `projection` input over its routed tokens (closed-form BCOS),
        the covariance in `dtype` (`kbvq_cli.moments.input_moments`)."""
        moments = self.expert_input(projection, expert, shared_path)
        if moments.sum_xxT is None:
            raise KbvqError("closed-form BCOS needs per-expert second moments; rerun `kbvq calibrate --restart` "
                            "with expert_second_moments: true in the recipe")
        return input_moments(moments.sum_x, moments.sum_xxT, moments.count.sum(), dtype)

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
