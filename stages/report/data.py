"""Read a run for the report: its model, the stages it needs (calibrate, klt-svd) and the optional ones.

Nothing here recomputes a stage. Whole shards are read through `StageDir.read_unit` (hash-checked);
where the report needs only shapes or one small tensor of every layer (storage, router load), it reads
the safetensors header or that one tensor instead of hashing gigabytes of moments: `open_finished`
has already checked that every committed shard is present at its recorded size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.model_files import safetensors_header as read_header
from kbvq_cli.recipe import RECIPE_FILE, load_recipe
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit
from stages.calibrate.reader import Calibration
from stages.klt_svd.reader import KltSvd

OPTIONAL_STAGES = ("vq", "bcos", "pack")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype (safetensors name, e.g. "F16") and shape, read from a file header."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo of every tensor in a safetensors file, from its header alone."""
    return {name: TensorInfo(entry["dtype"], tuple(entry["shape"])) for name, entry in read_header(path).items()}


def unit_header(stage_dir: StageDir, unit: str) -> dict[str, TensorInfo]:
    return safetensors_header(stage_dir.path / stage_dir.manifest["units"][unit]["file"])


def read_unit_tensor(stage_dir: StageDir, unit: str, key: str) -> torch.Tensor:
    """One tensor of a committed shard, without reading (and hashing) the rest of it."""
    from safetensors import safe_open

    with safe_open(str(stage_dir.path / stage_dir.manifest["units"][unit]["file"]), "pt") as handle:
        if key not in handle.keys():
            raise KbvqError(f"{stage_dir.stage} shard {unit} in {stage_dir.path.parent} has no {key}; "
                            f"rerun `kbvq {stage_dir.stage} --run {stage_dir.path.parent} --restart`")
        return handle.get_tensor(key)


def model_of(run_dir: Path) -> str:
    """The model recorded in RUN/recipe.yaml."""
    recipe_path = Path(run_dir) / RECIPE_FILE
    if not recipe_path.exists():
        raise KbvqError(f"{run_dir} has no {RECIPE_FILE}; run `kbvq calibrate --model MODEL --run {run_dir}` first")
    model = load_recipe(recipe_path).model
    if model is None:
        raise KbvqError(f"no model recorded in {recipe_path}; run `kbvq calibrate --model MODEL --run {run_dir}`")
    return model


def open_optional(run_dir: Path, stage: str) -> tuple[StageDir | None, str | None]:
    """(the finished stage, None), or (None, a line saying what to run to get it)."""
    try:
        return StageDir.open_finished(run_dir, stage), None
    except KbvqError as error:
        return None, str(error)


class RunView:
    """A run opened for reporting. calibrate and klt-svd must be finished; vq, bcos and pack may be absent."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise KbvqError(f"run directory {run_dir} does not exist; run `kbvq calibrate --model MODEL "
                            f"--run {run_dir}` first, or pass an existing --run")
        self.calibration = Calibration(self.run_dir)
        self.klt = KltSvd(self.run_dir)
        self.source = ModelSource(model_of(self.run_dir))
        self._optional = {name: open_optional(self.run_dir, name) for name in OPTIONAL_STAGES}

    def stage(self, name: str) -> StageDir | None:
        return self._optional[name][0]

    def missing(self, name: str) -> str | None:
        """Why an optional stage cannot be used (None when it can)."""
        return self._optional[name][1]

    def moe_layers(self) -> list[int]:
        return self.klt.layers()

    @property
    def min_expert_tokens(self) -> int:
        return int(self.calibration.stage_dir.manifest["config"].get("min_expert_tokens", 0))

    def vq_setting(self, key: str) -> int:
        """bits or dim of the vq stage (it must be present)."""
        return int(self.stage("vq").manifest["config"][key])

    def experts(self, index: int) -> LayerExperts:
        found = layer_experts(self.source, index, torch.float32)
        if found is None:
            raise KbvqError(f"layer {index} of {self.source.path} has no experts; the model does not match the run")
        return found

    def router_load(self, index: int) -> np.ndarray:
        """Routed tokens (top-k assignments) per expert of layer `index`, int64 [E]."""
        return read_unit_tensor(self.calibration.stage_dir, layer_unit(index), "router.load").long().numpy()

    def model_parameters(self) -> int:
        """Number of parameters in the model's safetensors files (headers only)."""
        return self.source.stored_totals()[0]


@dataclass(frozen=True)
class PartSpectrum:
    """One decomposed part's spectrum: singular values of the stack (descending) and rho for every k."""

    singular_values: np.ndarray  # [min(stack rows, ic)] float64; [rank] where klt-svd kept only the leading ones
    rho: np.ndarray  # [same]; rho[k - 1] = energy fraction of the top k (of the whole stack's energy)
    rank: int  # the rank klt-svd chose
    rho_k: float  # rho at that rank, as klt-svd recorded it (0 for rank 0)
    side: str  # "input" (stacked along the output dim) or "output" (down shared on its output side)
    klt: bool  # whether the stack was taken in KLT space


def layer_spectra(view: RunView, index: int) -> dict[str, PartSpectrum]:
    """Part name (gate, up, down, shared.down) -> its spectrum, for MoE layer `index`."""
    parts, out = view.klt.layer(index), {}
    for part, info in parts.parts.items():
        singular = parts.tensors[f"{part}.singular_values"].double().numpy()
        rho = parts.tensors[f"{part}.rho"].double().numpy()
        out[part] = PartSpectrum(singular, rho, info.rank, info.rho_k, info.side, info.klt)
    return out
