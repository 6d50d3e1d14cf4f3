"""Read `klt-svd`'s shards: the shared part `W_share` of any expert matrix, as stored (16-bit values)."""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.experts import SHARED
from kbvq_cli.stage_dir import StageDir, layer_unit
from stages.klt_svd.core import shared_part


class SharedParts:
    """One layer's decomposition. `share(projection, expert)` -> `W_share [oc, ic]` float32, or None."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict):
        self.tensors = tensors
        self.parts: dict[str, dict] = metadata.get("parts", {})

    def _part(self, name: str):
        if name not in self.parts:
            return None
        return self.parts[name]["side"], self.tensors[f"{name}.shared_basis"].float()

    def share(self, projection: str, expert) -> torch.Tensor | None:
        if expert == SHARED:
            if projection == "down":
                found = self._part(f"{SHARED}.down")
                return None if found is None else shared_part(found[0], found[1],
                                                               self.tensors[f"{SHARED}.down.expert_coeffs"][0].float())
            key = f"{projection}.shared_expert_coeffs"
            if key not in self.tensors:
                return None
            return shared_part("input", self.tensors[f"{projection}.shared_basis"].float(), self.tensors[key].float())
        found = self._part(projection)
        if found is None:
            return None
        return shared_part(found[0], found[1], self.tensors[f"{projection}.expert_coeffs"][expert].float())

    def residual(self, projection: str, expert, weight: torch.Tensor) -> torch.Tensor:
        """`W_spec = W - W_share` (METHOD.md §2 step 7), what `vq` quantizes."""
        share = self.share(projection, expert)
        return weight if share is None else weight - share.to(weight.device, weight.dtype)


class KltSvd:
    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, "klt-svd")

    def layers(self) -> list[int]:
        return [int(name.split("_")[1]) for name in self.stage_dir.unit_names()]

    def layer(self, index: int, device: str = "cpu") -> SharedParts:
        name = layer_unit(index)
        return SharedParts(self.stage_dir.read_unit(name, device), self.stage_dir.read_metadata(name))
