"""Decode on the `cpu` backend in a few compiled calls: whole projections, not just their VQ matmul.

At decode a layer's experts see one or a few tokens each, and the VQ matmul itself is a fraction of a
millisecond; what costs is the torch around it. `projection_forward` spends about twenty small torch ops
per projection (gathers of rows, codebooks and low-rank parts, dtype conversions, BCOS per expert, the
weighted `index_add_`), and each op that goes parallel wakes the thread pool: about 0.1 ms apiece under
`OMP_WAIT_POLICY=PASSIVE`, which made the packed layer slower than the original's bf16 one. Here the
routing is sorted in Python lists, and `kbvq_project` (cpu_kernels.cpp) computes, for each projection,
`(1 + scale) * (vq + low_rank) + shift` from the stored 16-bit parts as they are, in one parallel region:
gate and up of a routed layer in one call, down in a second that also adds each row into its token's output
with its router weight. Everything stays float32 between the calls.

Taken only when every expert has at most `DECODE_MAX_ROWS` rows (the compiled decode kernel's range) and the
sorted rows are few enough for Python lists (`MAX_ROWS`); anything else goes the general way.
"""

from __future__ import annotations

from typing import Callable

import torch

from kbvq_cli.kernels import cpu_backend
from kbvq_cli.kernels.common import Segment, code_bytes

MAX_ROWS = 256  # token-slots of one layer call sorted in Python; beyond, torch's sort is cheaper
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def fits(segments: list[Segment]) -> bool:
    """Whether every segment is small enough for the compiled decode kernel."""
    return all(end - start <= cpu_backend.DECODE_MAX_ROWS for _, start, end in segments)


class _Keep(list):
    """The tensors a batch of jobs points into, alive until the call returns."""

    def pointer(self, tensor: torch.Tensor | None) -> int | None:
        if tensor is None:
            return None
        self.append(tensor)
        return tensor.data_ptr()

    def part(self, tensor: torch.Tensor | None) -> cpu_backend.Part:
        if tensor is None:
            return cpu_backend.Part(None, 0)
        if tensor.dtype not in _DTYPES:
            tensor = tensor.float()
        return cpu_backend.Part(self.pointer(tensor.contiguous()), _DTYPES[tensor.dtype])


class _Segments:
    """Segments as the kernel reads them, made once for all the projections of a call."""

    def __init__(self, segments: list[Segment]):
        self.count = len(segments)
        self.bounds = torch.tensor([[start, end] for _, start, end in segments], dtype=torch.int64)
        self.experts = torch.tensor([expert for expert, _, _ in segments], dtype=torch.int64)


def _job(keep: _Keep, x: torch.Tensor, parts, segments: _Segments, rows: int, out: torch.Tensor,
         source: torch.Tensor | None = None, target: torch.Tensor | None = None,
         weight: torch.Tensor | None = None) -> cpu_backend.Job:
    """x [X, ic] float32 contiguous; out [rows, oc] (or [targets, oc] with target/weight) float32."""
    indices = parts.indices.contiguous()
    _, oc, _ = indices.shape
    num_codes, d = parts.codebook.shape[1:]
    rank = 0 if parts.shared_basis is None else parts.shared_basis.shape[0]
    return cpu_backend.Job(
        keep.pointer(x), x.shape[0], keep.pointer(source), rows, keep.pointer(segments.bounds), keep.pointer(segments.experts),
        segments.count, keep.pointer(indices), code_bytes(indices), oc, x.shape[1], num_codes, d,
        keep.part(parts.codebook), keep.part(parts.scale), keep.part(parts.shift), int(parts.side == "output"),
        rank, keep.part(parts.shared_basis), keep.part(parts.expert_coeffs), keep.pointer(out),
        keep.pointer(target), keep.pointer(weight))


def projection(x: torch.Tensor, parts, segments: list[Segment]) -> torch.Tensor:
    """The whole projection of rows sorted by expert: x [N, ic] -> [N, oc] float32 (rows of no segment: 0)."""
    x = x.float().contiguous()
    out = torch.zeros(x.shape[0], parts.indices.shape[1])  # the kernel writes the segments' rows only
    keep = _Keep()
    cpu_backend.project([_job(keep, x, parts, _Segments(segments), x.shape[0], out)])
    return out


def _route(top_k_index: torch.Tensor, num_experts: int) -> tuple[list[int], list[int], list[Segment]]:
    """The router's choices sorted by expert (then token, then slot, as a stable sort of the flat choices
    does): token and slot of each row, and the segments. Slots outside 0..num_experts-1 are dropped."""
    rows = sorted((expert, token, slot) for token, choices in enumerate(top_k_index.tolist())
                  for slot, expert in enumerate(choices) if 0 <= expert < num_experts)
    segments, start = [], 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or rows[index][0] != rows[start][0]:
            segments.append((rows[start][0], start, index))
            start = index
    return [row[1] for row in rows], [row[2] for row in rows], segments


def moe(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate, up, down,
        act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """A routed layer at decode (see `moe_experts_forward`), or None when it is not decode-sized."""
    if top_k_index.numel() > MAX_ROWS:
        return None
    token, slot, routed = _route(top_k_index, gate.num_experts)
    if not fits(routed):
        return None
    segments = _Segments(routed)
    x = hidden.float().contiguous()
    rows = len(token)
    source = torch.tensor(token, dtype=torch.int64)
    router = top_k_weights.float().tolist()  # lists, not a torch gather: see the module docstring
    weights = torch.tensor([router[t][s] for t, s in zip(token, slot)], dtype=torch.float32)
    gate_out, up_out = torch.empty(rows, gate.indices.shape[1]), torch.empty(rows, up.indices.shape[1])
    keep = _Keep()
    cpu_backend.project([_job(keep, x, gate, segments, rows, gate_out, source=source),
                         _job(keep, x, up, segments, rows, up_out, source=source)])
    inner = (act_fn(gate_out) * up_out).contiguous()
    output = torch.zeros(hidden.shape[0], down.indices.shape[1])
    cpu_backend.project([_job(keep, inner, down, segments, rows, output, target=source, weight=weights)])
    return output.to(hidden.dtype)
