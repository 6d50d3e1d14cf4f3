"""Exact nearest-codeword assignment, two ways behind one interface.

- `faiss`: `IndexFlatL2` (exhaustive, exact), CPU, all cores; the default for large stacks.
- `torch`: chunked `||x||^2 - 2 x c^T + ||c||^2` then argmin, on the points' device (CPU or CUDA).
Both return `(indices int64 [N], squared distances float32 [N])`, the distances as the expansion
gives them (what faiss.Kmeans reports too); the exact objective is computed where it is reported.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kbvq_cli.errors import KbvqError


class AssignBackend(Protocol):
    name: str

    def assign(self, points: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchBackend:
    name = "torch"

    def __init__(self, chunk_elements: int = 1 << 20):
        self.chunk_elements = chunk_elements  # the [chunk, K] score block: 4 MB in float32, cache-sized

    def assign(self, points: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codebook_sq = codebook.pow(2).sum(1)
        chunk = max(1, self.chunk_elements // codebook.shape[0])
        indices = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
        distances = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
        for begin in range(0, points.shape[0], chunk):
            block = points[begin:begin + chunk]
            # ||x||^2 is the same for every codeword of a row: the argmin needs only -2 x c + ||c||^2
            scores = torch.addmm(codebook_sq, block, codebook.T, beta=1.0, alpha=-2.0)
            best, indices[begin:begin + chunk] = scores.min(1)
            distances[begin:begin + chunk] = (best + block.pow(2).sum(1)).clamp_min_(0)
        return indices, distances


class FaissBackend:
    name = "faiss"

    def assign(self, points: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss
        import numpy as np

        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(np.ascontiguousarray(codebook.detach().cpu().numpy(), dtype=np.float32))
        host_points = np.ascontiguousarray(points.detach().cpu().numpy(), dtype=np.float32)
        found_distances, found = index.search(host_points, 1)  # [N, 1] each, int64 and float32
        # [N, 1] -> [N] as views: no copy of either (the indices' copy cost 1-2 ms a call)
        indices = torch.from_numpy(found.reshape(-1).astype(np.int64, copy=False)).to(points.device)
        return indices, torch.from_numpy(found_distances.reshape(-1)).to(points.device)


def make_backend(name: str) -> AssignBackend:
    if name == "torch":
        return TorchBackend()
    if name == "faiss":
        return FaissBackend()
    raise KbvqError(f"unknown vq backend {name!r}; use faiss or torch")
