"""The VQ matmul of one expert or of all experts of a layer, on the backend `KBVQ_KERNELS` names.

Backends (`KBVQ_KERNELS`, or the `backend=` argument, which wins):
  reference  dequantize each expert whole and multiply (the semantics of `kbvq_cli.packed.reference`)
  torch      vectorised pure torch, no compiler (LUT decode, tiled prefill): runs anywhere torch does
  cpu        `cpu_kernels.cpp` compiled once per machine (LUT GEMV decode, compiled dequantize for prefill)
  triton     Triton kernels for CUDA tensors (or any tensors under TRITON_INTERPRET=1)
  auto       (default) triton for CUDA tensors when triton imports, cpu for CPU tensors when it builds,
             else torch
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

from kbvq_cli.kernels.common import check_experts, segments_from_offsets

# One explicit registry: backend name -> the module holding its `experts_forward(x, segments, indices,
# codebook) -> [N, oc] float32`. Imported on first use, so triton is only imported when asked for.
BACKENDS = {
    "reference": "kbvq_cli.kernels.reference",
    "torch": "kbvq_cli.kernels.torch_backend",
    "cpu": "kbvq_cli.kernels.cpu_backend",
    "triton": "kbvq_cli.kernels.triton_backend",
}
ENV_VAR = "KBVQ_KERNELS"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _auto(x: torch.Tensor) -> str:
    if x.is_cuda:
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    cpu = importlib.import_module(BACKENDS["cpu"])
    if cpu.available():
        return "cpu"
    warnings.warn(f"kbvq kernels: compiled CPU kernels unavailable ({cpu.unavailable_reason()}); using the slower "
                  "pure-torch backend", RuntimeWarning, stacklevel=3)
    return "torch"


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend name that will run for input `x`: `backend`, else `$KBVQ_KERNELS`, else `auto`."""
    name = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if name == "auto":
        return _auto(x)
    if name not in BACKENDS:
        raise ValueError(f"unknown kbvq kernels backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "cpu" and x.device.type != "cpu":
        raise ValueError(f"the cpu backend takes CPU tensors, got {x.device}")
    if name == "triton" and not x.is_cuda and not _triton_interpreting():
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before triton loads)")
    return name


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    return importlib.import_module(BACKENDS[name])


def vq_experts_forward(x: torch.Tensor, offsets: torch.Tensor | list[int], indices: torch.Tensor,
                       codebook: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`y[r] = dequant(indices[e], codebook[e]) @ x[r]` for the rows of every expert at once.

    x         [N, ic] float16|bfloat16|float32, rows sorted by expert
    offsets   int [n+1] (tensor or list): expert e owns rows offsets[e]:offsets[e+1]; empty experts allowed
    indices   [n, oc, ic/d] torch.uint8 (8-bit codes) or torch.int16 (12/16-bit codes, unsigned value)
    codebook  [n, K, d] float16|bfloat16|float32, K = 2^(bits per code)
    returns   [N, oc] float32 (accumulated in float32; the caller casts after adding its other terms)

    Per expert, few rows take the decode path (LUT GEMV) and many the prefill path (tiled dequantize and
    matmul); where the line lies depends on the backend.
    """
    n = check_experts(x, indices, codebook)[0]
    segments = segments_from_offsets(offsets, n, x.shape[0])
    return backend_module(resolve_backend(x, backend)).experts_forward(x, segments, indices, codebook)


def vq_matmul(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """`x @ dequant(indices, codebook)^T` for one expert, never forming the [oc, ic] matrix on fast backends.

    x [T, ic] float16|bfloat16|float32; indices [oc, ic/d] torch.uint8|torch.int16; codebook [K, d] float
    -> [T, oc] in x's dtype (float32 accumulation).
    """
    out = vq_experts_forward(x, [0, x.shape[0]], indices[None], codebook[None], backend=backend)
    return out.to(x.dtype)
