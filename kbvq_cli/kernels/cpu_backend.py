"""`cpu` backend: `cpu_kernels.cpp` compiled once per machine with the system C++ compiler, called via ctypes.

Why a plain shared library and not `torch.utils.cpp_extension.load_inline`: the same kernels run as fast
either way, but torch's headers take ~45 s to compile against and this file ~2 s, and it needs no ninja and
no Python headers (docs/kernels.md has the measurements). Built with `-march=native`, so the cache key holds
the CPU's identity as well as the source, flags and compiler. The library lives in `<cache>/kernels/`
(`~/.cache/kbvq/kernels/`, or `$KBVQ_CACHE/kernels/`); a machine without a compiler gets
`available() == False` and `auto` falls back to the `torch` backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kbvq_cli.hashing import cache_dir
from kbvq_cli.kernels import torch_backend
from kbvq_cli.kernels.common import Segment, code_bytes

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# Rows per expert up to which the compiled decode kernel beats dequantizing a tile + MKL matmul: at
# 1408x2048, 16 rows take 3.1 against 4.3 ms, 24 rows 5.4 against 5.3 ms (docs/kernels.md).
DECODE_MAX_ROWS = 16

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Part(ctypes.Structure):
    """A stored tensor as `kbvq_project` reads it (cpu_kernels.cpp `Part`): data 0 means absent."""
    _fields_ = [("data", _PTR), ("dtype", _I64)]


class Job(ctypes.Structure):
    """One fused decode projection (cpu_kernels.cpp `Job`, field for field); built by `fused_decode.py`."""
    _fields_ = [("x", _PTR), ("x_rows", _I64), ("source", _PTR), ("rows", _I64), ("seg_bounds", _PTR),
                ("seg_expert", _PTR), ("segments", _I64), ("codes", _PTR), ("code_bytes", _I64), ("oc", _I64),
                ("ic", _I64), ("K", _I64), ("d", _I64), ("codebook", Part), ("scale", Part), ("shift", Part),
                ("output_side", _I64), ("rank", _I64), ("basis", Part), ("coeffs", Part), ("out", _PTR),
                ("target", _PTR), ("weight", _PTR)]


_SIGNATURES = {
    "kbvq_decode": [_PTR, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR],
    "kbvq_dequantize": [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR],
    "kbvq_project": [ctypes.POINTER(Job), _I64, _I64],
    "kbvq_cluster_sums": [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR],
}


class KernelUnavailable(RuntimeError):
    """The compiled CPU kernels cannot be built or loaded on this machine (the message says why)."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU, so a cache on a shared home never serves a build for another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n".join(sorted(set(wanted)))


def library_path(compiler: str) -> Path:
    """Where the build for this source, compiler, flags and CPU lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu_identity().encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiled beside the target and renamed into place, so concurrent processes never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build {SOURCE.name}:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); tried once per process."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX, or install g++)"
    try:
        target = library_path(compiler)
        if not target.exists():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except (KernelUnavailable, OSError) as error:
        return None, str(error)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library, ""


def available() -> bool:
    """Whether the compiled kernels load here (building them on the first call, ~2 s)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why the compiled kernels do not load here ("" when they do)."""
    return _load()[1]


def library() -> ctypes.CDLL:
    """The loaded kernels; raises KernelUnavailable with the reason when they cannot be built."""
    loaded, reason = _load()
    if loaded is None:
        raise KernelUnavailable(reason)
    return loaded


def _check(status: int, function: str) -> None:
    if status != 0:
        raise ValueError(f"{function} rejected its arguments (status {status})")


def _check_pointers(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor, out: torch.Tensor,
                    num_experts: int) -> None:
    """What the C side trusts without checking: dtypes, layouts, and rows and experts in range."""
    if not (x.dtype == out.dtype == torch.float32 and x.is_contiguous() and out.is_contiguous()
            and indices.is_contiguous() and x.device.type == out.device.type == indices.device.type == "cpu"):
        raise ValueError("decode_segments takes contiguous float32 CPU x and out and contiguous CPU indices")
    if out.shape != (x.shape[0], indices.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(x.shape[0], indices.shape[1])}")
    if any(not (0 <= start <= end <= x.shape[0] and 0 <= expert < num_experts) for expert, start, end in segments):
        raise ValueError("a segment lies outside x's rows or the experts")


def dequantize_tile(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices [rows, J] uint8|int16 (contiguous), codebook [K, d] float32 -> [rows, J*d] float32."""
    rows, groups = indices.shape
    d = codebook.shape[1]
    indices, codebook = indices.contiguous(), codebook.float().contiguous()
    out = torch.empty(rows, groups * d)
    _check(library().kbvq_dequantize(indices.data_ptr(), code_bytes(indices), rows, groups, codebook.data_ptr(),
                                     d, torch.get_num_threads(), out.data_ptr()), "kbvq_dequantize")
    return out


def decode_segments(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor, codebook: torch.Tensor,
                    out: torch.Tensor, lut: bool = False) -> None:
    """Write `out[start:end] = x[start:end] @ dequant(indices[e], codebook[e])^T` for every segment, in one call.

    x [N, ic] float32 contiguous, indices [n, oc, J] contiguous, codebook [n, K, d], out [N, oc] float32.
    Each code's codebook row is multiplied with its group of x, up to 8 tokens sharing each load. `lut=True`
    sends single tokens through the lookup-table GEMV instead, which measures slower on AVX2 (0.55 against
    0.30 ms for a 1408x2048 expert, docs/kernels.md) and so is off by default.
    """
    n, oc, _ = indices.shape
    num_codes, d = codebook.shape[1:]
    _check_pointers(x, segments, indices, out, n)
    experts = torch.tensor([expert for expert, _, _ in segments], dtype=torch.int64)
    bounds = torch.tensor([[start, end] for _, start, end in segments], dtype=torch.int64)
    codebooks = codebook[experts].float().contiguous()  # only the experts that have rows
    _check(library().kbvq_decode(
        x.data_ptr(), bounds.data_ptr(), len(segments), indices.data_ptr(), code_bytes(indices),
        experts.data_ptr(), codebooks.data_ptr(), oc, x.shape[1], num_codes, d, int(lut), torch.get_num_threads(),
        out.data_ptr()), "kbvq_decode")


def project(jobs: list[Job]) -> None:
    """Run fused decode projections (`Job`s whose tensors the caller keeps alive) in one parallel region."""
    array = (Job * len(jobs))(*jobs)
    _check(library().kbvq_project(array, len(jobs), torch.get_num_threads()), "kbvq_project")


def experts_forward(x: torch.Tensor, segments: list[Segment], indices: torch.Tensor,
                    codebook: torch.Tensor) -> torch.Tensor:
    """x [N, ic] float, indices [n, oc, J], codebook [n, K, d] -> [N, oc] float32 (rows of no segment are 0).
    CPU tensors only."""
    x, indices = x.float().contiguous(), indices.contiguous()
    out = torch.zeros(x.shape[0], indices.shape[1])
    decode = [seg for seg in segments if seg[2] - seg[1] <= DECODE_MAX_ROWS]
    if decode:
        decode_segments(x, decode, indices, codebook, out)
    for expert, start, end in segments:
        if end - start > DECODE_MAX_ROWS:
            out[start:end] = torch_backend.tiled_matmul(x[start:end], indices[expert], codebook[expert].float(),
                                                        dequantize_tile)
    return out


def cluster_sums(points: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (float64 [k, d]) and counts (int64 [k]) of `points [N, d]` float32 by `indices [N]`
    int64 in [0, k), both contiguous CPU tensors: bit-identical to one weighted `torch.bincount` per
    coordinate (the vq stage's centroid update, `stages.vq.core.cluster_sums`), in one pass."""
    if not (points.dtype == torch.float32 and indices.dtype == torch.int64 and points.is_contiguous()
            and indices.is_contiguous() and points.device.type == indices.device.type == "cpu"
            and points.dim() == 2 and indices.shape == points.shape[:1]):
        raise ValueError("cluster_sums takes contiguous CPU float32 points [N, d] and int64 indices [N]")
    sums = torch.empty(k, points.shape[1], dtype=torch.float64)
    counts = torch.empty(k, dtype=torch.int64)
    status = library().kbvq_cluster_sums(points.data_ptr(), indices.data_ptr(), points.shape[0], points.shape[1], k,
                                         sums.data_ptr(), counts.data_ptr())
    if status != 0:
        raise ValueError(f"cluster_sums: an index lies outside [0, {k})")
    return sums, counts
