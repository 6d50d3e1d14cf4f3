"""Read `vq`'s units: the quantized expert matrices `What = W_share + VQ(W_spec)` as the packed model holds them.

The unit schema, defined here and used by the stage that writes it and by every reader: one unit per
expert (`kbvq_cli.units.expert_unit`), holding per projection `P` (gate, up, down) `P.codebook`
[K, d] float16 (the stored, final values) and `P.indices` [oc, ic/d] int16; its metadata (`VqExpertMeta`)
records the relative errors per projection. K = 2^(b d) and d are the projection's own: vq's settings, or
the code size a bit budget chose for the (layer, projection) (`VqExpertUnit.code_size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.experts import PROJECTIONS, LayerExperts
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import expert_unit
from stages.klt_svd.reader import KltSvd, SharedParts
from stages.vq.core import dequantize

STAGE = "vq"
CODEBOOK_DTYPE = torch.float16
INDEX_DTYPE = torch.int16  # holds every code up to 15 bits as is; 16-bit codes wrap and are read back unsigned


@dataclass(frozen=True)
class VqExpertUnit:
    """One expert's codes: projection -> codebook [K, d] float16, projection -> indices [oc, ic/d]."""

    codebooks: dict[str, torch.Tensor]
    indices: dict[str, torch.Tensor]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for projection in PROJECTIONS:
            tensors[f"{projection}.codebook"] = self.codebooks[projection].to(CODEBOOK_DTYPE)
            tensors[f"{projection}.indices"] = self.indices[projection].to(INDEX_DTYPE)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "VqExpertUnit":
        # int16 wraps codes >= 2^15 to negatives: read back as the unsigned values they are.
        return cls({p: tensors[f"{p}.codebook"] for p in PROJECTIONS},
                   {p: tensors[f"{p}.indices"].to(torch.int64) & 0xFFFF for p in PROJECTIONS})

    def code_size(self, projection: str) -> tuple[int, int]:
        """(bits, dim) of one projection's codes, from its codebook [2^(bits dim), dim] (a bit budget may
        give the projections different sizes: stages/klt_svd/budget.py)."""
        codewords, dim = self.codebooks[projection].shape
        return (codewords.bit_length() - 1) // dim, dim

    def matrix(self, projection: str, parts: SharedParts, expert, shape: tuple[int, int]) -> torch.Tensor:
        """`W_share + dequant(indices, codebook)` [oc, ic] float32 of one projection."""
        specific = dequantize(self.indices[projection], self.codebooks[projection].float(), shape)
        share = parts.share(projection, expert)
        return specific if share is None else specific + share.to(specific.device)


@dataclass(frozen=True)
class VqExpertMeta:
    """Relative errors per projection: of the residual's weights, of the output with the shared part alone
    and with the shared part plus VQ (`Tr(E C E^T) / Tr(W C W^T)`)."""

    layer: int
    expert: object  # int, or kbvq_cli.units.SHARED
    relative_error: dict[str, float]
    output_error_before: dict[str, float]
    output_error: dict[str, float]

    @classmethod
    def from_json(cls, data: dict) -> "VqExpertMeta":
        return cls(int(data["layer"]), data["expert"], dict(data["relative_error"]),
                   dict(data["output_error_before"]), dict(data["output_error"]))

    def to_json(self) -> dict:
        return {"layer": self.layer, "expert": self.expert, "relative_error": self.relative_error,
                "output_error_before": self.output_error_before, "output_error": self.output_error}


class VqCodes:
    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, STAGE)

    @property
    def bits(self) -> int:
        return int(self.stage_dir.manifest["config"]["bits"])

    @property
    def dim(self) -> int:
        return int(self.stage_dir.manifest["config"]["dim"])

    def has(self, layer: int, expert) -> bool:
        return self.stage_dir.has_unit(expert_unit(layer, expert))

    def expert(self, layer: int, expert, device: str = "cpu") -> VqExpertUnit:
        return VqExpertUnit.from_tensors(self.stage_dir.read_unit(expert_unit(layer, expert), device))

    def meta(self, layer: int, expert) -> VqExpertMeta:
        return VqExpertMeta.from_json(self.stage_dir.read_metadata(expert_unit(layer, expert)))

    def quantized_matrices(self, experts: LayerExperts, klt: KltSvd, index: int, device) -> "QuantizedMatrices":
        """`What` of layer `index`'s experts, built one matrix at a time when asked for."""
        return QuantizedMatrices(self, klt.layer(index, device), experts, index, device)

    def quantized_layer(self, experts: LayerExperts, klt: KltSvd, index: int, device) -> dict:
        """(projection, expert) -> What [oc, ic] float32 for every expert of the layer, all at once: for a
        caller that installs the whole layer (`bcos --propagate`); one matrix at a time is `quantized_matrices`."""
        quantized = self.quantized_matrices(experts, klt, index, device)
        return {(projection, expert): quantized(projection, expert)
                for expert in experts.expert_ids() for projection in PROJECTIONS}


class QuantizedMatrices:
    """`quantized(projection, expert)` -> What [oc, ic] float32 of one expert's projection, built on each
    call and kept by nobody here: only the last expert's codes are held (its unit is read once for its
    three projections), so a caller that goes expert by expert holds one expert's What at a time (a
    Mixtral layer's are 5.6 GB together)."""

    def __init__(self, codes: VqCodes, parts: SharedParts, experts: LayerExperts, index: int, device):
        self.codes, self.parts, self.experts, self.index, self.device = codes, parts, experts, index, device
        self._unit: tuple[object, VqExpertUnit] | None = None

    def __call__(self, projection: str, expert) -> torch.Tensor:
        if self._unit is None or self._unit[0] != expert:
            self._unit = None  # free the previous expert's codes before reading the next
            self._unit = (expert, self.codes.expert(self.index, expert, self.device))
        shape = tuple(self.experts.matrix(projection, expert).shape)
        return self._unit[1].matrix(projection, self.parts, expert, shape)
