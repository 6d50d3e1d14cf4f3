"""Read `vq`'s units: the quantized expert matrices `What = W_share + VQ(W_spec)` as the packed model holds them."""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.stage_dir import StageDir
from stages.klt_svd.reader import SharedParts
from stages.vq.core import dequantize
from stages.vq.stage import unit_name


class VqCodes:
    def __init__(self, run_dir: Path):
        self.stage_dir = StageDir.open_finished(run_dir, "vq")

    def has(self, layer: int, expert) -> bool:
        return self.stage_dir.has_unit(unit_name(layer, expert))

    def expert(self, layer: int, expert, device: str = "cpu") -> dict[str, torch.Tensor]:
        return self.stage_dir.read_unit(unit_name(layer, expert), device)


def quantized_matrix(codes: dict[str, torch.Tensor], parts: SharedParts, projection: str, expert,
                     shape: tuple[int, int]) -> torch.Tensor:
    """`W_share + dequant(indices, codebook)` [oc, ic] float32."""
    specific = dequantize(codes[f"{projection}.indices"], codes[f"{projection}.codebook"].float(), shape)
    share = parts.share(projection, expert)
    return specific if share is None else specific + share.to(specific.device)
