"""Read `klt-svd`'s shards: the shared part `W_share` of any expert matrix, as stored (16-bit values).

The shard schema, defined here and used by the stage that writes it and by every reader:
- per decomposed part `P` (`gate`, `up`, `down`, `shared.down`): tensors `P.shared_basis`, `P.expert_coeffs`
  (16-bit), `P.singular_values`, `P.rho` (float32), and metadata `parts[P]` = {side, rank, rho_k, klt};
- `P.shared_expert_coeffs` where the shared expert is stacked with the routed ones (gate, up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import SHARED, layer_unit, unit_layer

STAGE = "klt-svd"


@dataclass(frozen=True)
class PartMeta:
    """How one part was decomposed: the side its basis is shared on, the rank, rho_k, whether the KLT was used."""

    side: str
    rank: int
    rho_k: float
    klt: bool

    @classmethod
    def from_json(cls, data: dict) -> "PartMeta":
        return cls(str(data["side"]), int(data["rank"]), float(data["rho_k"]), bool(data["klt"]))

    def to_json(self) -> dict:
        return {"side": self.side, "rank": self.rank, "rho_k": self.rho_k, "klt": self.klt}


@dataclass(frozen=True)
class KltLayerMeta:
    layer: int
    parts: dict[str, PartMeta]

    @classmethod
    def from_json(cls, data: dict) -> "KltLayerMeta":
        return cls(int(data["layer"]), {name: PartMeta.from_json(p) for name, p in data.get("parts", {}).items()})

    def to_json(self) -> dict:
        return {"layer": self.layer, "parts": {name: part.to_json() for name, part in self.parts.items()}}


def check_budget_code_size(run_dir: Path, stage: str, bits: int | None = None, dim: int | None = None,
                           corrected: bool | None = None) -> None:
    """Refuse vq's or bcos's settings when klt-svd chose its ranks for a bit budget (`--target-bits`) at
    another code size (its manifest's `state.budget.assumes`); nothing to check without a budget."""
    from kbvq_cli.errors import KbvqError
    from kbvq_cli.stage_dir import MANIFEST, read_manifest

    if not (Path(run_dir) / STAGE / MANIFEST).exists():
        return
    recorded = read_manifest(Path(run_dir) / STAGE).get("state", {}).get("budget")
    if not recorded:
        return
    have = {key: value for key, value in (("bits", bits), ("dim", dim), ("corrected", corrected)) if value is not None}
    differ = [key for key, value in have.items() if value != recorded["assumes"].get(key)]
    if differ:
        listed = ", ".join(f"{key} {have[key]} (the budget's: {recorded['assumes'].get(key)})" for key in differ)
        raise KbvqError(f"{stage}: klt-svd chose its ranks for target_bits {recorded['target_bits']} at other "
                        f"settings: {listed}; use the budget's, or redo klt-svd under these (`kbvq klt-svd --restart`)")


def budget_code_sizes(run_dir: Path) -> dict[int, dict[str, tuple[int, int]]] | None:
    """layer -> projection -> (bits, dim) that a budget with code sizes chose (klt-svd's manifest
    `state.budget.code_sizes`), or None: every matrix at vq's own settings."""
    from kbvq_cli.stage_dir import MANIFEST, read_manifest

    if not (Path(run_dir) / STAGE / MANIFEST).exists():
        return None
    sizes = (read_manifest(Path(run_dir) / STAGE).get("state", {}).get("budget") or {}).get("code_sizes")
    if not sizes:
        return None
    return {int(layer): {projection: _bits_dim(name) for projection, name in found.items()}
            for layer, found in sizes.items()}


def _bits_dim(name: str) -> tuple[int, int]:
    bits, _, dim = name.partition("x")
    return int(bits), int(dim)


def read_layer_meta(stage_dir: StageDir, index: int) -> KltLayerMeta:
    return KltLayerMeta.from_json(stage_dir.read_metadata(layer_unit(index)))


@dataclass(frozen=True)
class SharedParts:
    """One layer's decomposition. `share(projection, expert)` -> `W_share [oc, ic]` float32, or None."""

    tensors: dict[str, torch.Tensor]
    meta: KltLayerMeta

    @property
    def parts(self) -> dict[str, PartMeta]:
        return self.meta.parts

    def basis(self, name: str) -> torch.Tensor | None:
        """The stored 16-bit `shared_basis` of part `name`, or None if it was not decomposed."""
        return self.tensors[f"{name}.shared_basis"] if name in self.parts else None

    def coeffs(self, name: str) -> torch.Tensor | None:
        """The stored 16-bit `expert_coeffs` of part `name` ([E, oc, k] / [E, k, ic]), or None."""
        return self.tensors[f"{name}.expert_coeffs"] if name in self.parts else None

    def stacked_shared_coeffs(self, projection: str) -> torch.Tensor | None:
        """The shared expert's coefficients [Is, k] against the routed basis, where it was stacked."""
        return self.tensors.get(f"{projection}.shared_expert_coeffs")

    def share(self, projection: str, expert) -> torch.Tensor | None:
        """`W_share` [oc, ic] float32 of one expert (or the shared expert), or None where none was split off."""
        factors = self.share_factors(projection, expert)
        return None if factors is None else factors[0] @ factors[1]

    def share_factors(self, projection: str, expert) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left [oc, k], right [k, ic]) float32 with `share(projection, expert) == left @ right`, or None."""
        if expert == SHARED:
            if projection == "down":
                name = f"{SHARED}.down"
                return None if name not in self.parts else _factors(
                    self.parts[name].side, self.basis(name).float(), self.coeffs(name)[0].float())
            stacked = self.stacked_shared_coeffs(projection)
            if stacked is None:
                return None
            return stacked.float(), self.tensors[f"{projection}.shared_basis"].float()
        if projection not in self.parts:
            return None
        return _factors(self.parts[projection].side, self.basis(projection).float(), self.coeffs(projection)[expert].float())

    def residual(self, projection: str, expert, weight: torch.Tensor) -> torch.Tensor:
        """`W_spec = W - W_share` (docs/method.md §2 step 7), what `vq` quantizes."""
        share = self.share(projection, expert)
        return weight if share is None else weight - share.to(weight.device, weight.dtype)


def _factors(side: str, basis: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`shared_part`'s two factors, left and right: coeffs @ basis (input side), basis^T @ coeffs (output)."""
    return (coeffs, basis) if side == "input" else (basis.T, coeffs)


class KltSvd:
    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, STAGE)

    def layers(self) -> list[int]:
        return [unit_layer(name) for name in self.stage_dir.unit_names()]

    def layer(self, index: int, device: str = "cpu") -> SharedParts:
        return SharedParts(self.stage_dir.read_unit(layer_unit(index), device), self.layer_meta(index))

    def layer_meta(self, index: int) -> KltLayerMeta:
        return read_layer_meta(self.stage_dir, index)
