"""kbvq_cli.kernels: every backend against a float64 computation of the projection formula.

Triton reads TRITON_INTERPRET when it is imported, so its cases run in a child pytest started with
TRITON_INTERPRET=1 (`test_triton_backend_under_interpreter`); started that way, this file runs them in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional

from kbvq_cli import kernels
from kbvq_cli.kernels import cpu_backend, torch_backend
from kbvq_cli.kernels.api import resolve_backend
from kbvq_cli.kernels.projection import VqParts
from kbvq_cli.packed.reference import VqExperts, VqProjection

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference", "torch", "cpu", "triton"]
N_EXPERTS, OC, IC, D, RANK = 4, 37, 32, 4, 3  # odd oc; ic = 8 groups of d = 4
DECODE_ROWS, PREFILL_ROWS = [1, 0, 3, 2], [64, 0, 5, 40]  # rows per expert; expert 1 gets none
TOLERANCE = 1e-3


def require_cpu_kernels() -> None:
    """Skip without a compiler; with one, a failing build is a failure."""
    if not cpu_backend.available():
        if shutil.which("g++") or shutil.which("c++") or os.environ.get("CXX"):
            pytest.fail(f"a compiler exists but the cpu kernels do not build: {cpu_backend.unavailable_reason()}")
        pytest.skip(f"no compiled cpu kernels: {cpu_backend.unavailable_reason()}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "cpu":
        require_cpu_kernels()
    if request.param == "triton":
        pytest.importorskip("triton")
        if not INTERPRETING:
            pytest.skip("triton runs in the TRITON_INTERPRET=1 child of test_triton_backend_under_interpreter")
    return request.param


def to_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes as stored: uint8 for 8 bits, int16 holding the unsigned value (its bit pattern) otherwise."""
    if bits == 8:
        return values.to(torch.uint8)
    return torch.where(values >= 1 << 15, values - (1 << 16), values).to(torch.int16)


def make_parts(bits: int, side: str | None = None, bcos: bool = False, oc: int = OC, ic: int = IC, d: int = D,
               dtype: torch.dtype = torch.float16, seed: int = 0) -> VqParts:
    gen = torch.Generator().manual_seed(seed)
    num_codes = 1 << bits
    values = torch.randint(0, num_codes, (N_EXPERTS, oc, ic // d), generator=gen)
    values[:, 0, 0] = num_codes - 1  # the largest code, negative as int16 for 16 bits
    codebook = (torch.randn(N_EXPERTS, num_codes, d, generator=gen) * 0.5).to(dtype)
    extra = {}
    if bcos:
        extra["scale"] = (torch.randn(N_EXPERTS, oc, generator=gen) * 0.1).to(dtype)
        extra["shift"] = (torch.randn(N_EXPERTS, oc, generator=gen) * 0.1).to(dtype)
    if side is not None:
        basis, coeffs = ((RANK, ic), (N_EXPERTS, oc, RANK)) if side == "input" else ((RANK, oc), (N_EXPERTS, RANK, ic))
        extra["shared_basis"] = torch.randn(*basis, generator=gen).to(dtype)
        extra["expert_coeffs"] = (torch.randn(*coeffs, generator=gen) * 0.3).to(dtype)
        extra["side"] = side
    return VqParts(to_codes(values, bits), codebook, **extra)


def float64_projection(x: torch.Tensor, parts: VqParts, rows: list[int]) -> torch.Tensor:
    """The formula, expert by expert, in float64, with the codes decoded independently of the library."""
    n, oc, groups = parts.indices.shape
    outputs, start = [], 0
    for expert, count in enumerate(rows):
        xe = x[start:start + count].double()
        start += count
        codes = parts.indices[expert].long() & 0xFFFF
        y = xe @ parts.codebook[expert].double()[codes].reshape(oc, -1).T
        if parts.shared_basis is not None:
            basis, coeffs = parts.shared_basis.double(), parts.expert_coeffs[expert].double()
            y = y + ((xe @ basis.T) @ coeffs.T if parts.side == "input" else (xe @ coeffs.T) @ basis)
        if parts.scale is not None:
            y = y * (1 + parts.scale[expert].double()) + parts.shift[expert].double()
        outputs.append(y)
    return torch.cat(outputs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    """Relative to the output's scale: max |actual - expected| <= tolerance * max |expected|."""
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3g} exceeds {tolerance} x {scale:.3g}"


def offsets_of(rows: list[int]) -> list[int]:
    return [0] + torch.tensor(rows).cumsum(0).tolist()


def random_x(rows: list[int], dtype=torch.float32, ic: int = IC, seed: int = 1) -> torch.Tensor:
    return torch.randn(sum(rows), ic, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("rows", [DECODE_ROWS, PREFILL_ROWS], ids=["decode", "prefill"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_experts_forward_matches_float64(backend, bits, rows):
    parts = make_parts(bits)
    x = random_x(rows)
    out = kernels.vq_experts_forward(x, offsets_of(rows), parts.indices, parts.codebook, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (sum(rows), OC)
    assert_close(out, float64_projection(x, parts, rows))


@pytest.mark.parametrize("bcos", [False, True], ids=["plain", "bcos"])
@pytest.mark.parametrize("side", [None, "input", "output"], ids=["no-basis", "input-side", "output-side"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_projection_forward_matches_float64(backend, bits, side, bcos):
    rows = [2, 0, 64, 1]  # decode and prefill experts in one call
    parts = make_parts(bits, side, bcos)
    x = random_x(rows)
    out = kernels.projection_forward(x, parts, offsets_of(rows), backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, float64_projection(x, parts, rows))


@pytest.mark.parametrize("x_dtype,codebook_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                    (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("rows", [[3, 1, 0, 2], [64, 0, 17, 1]], ids=["decode", "prefill"])
def test_16_bit_inputs_accumulate_in_float32(backend, x_dtype, codebook_dtype, rows):
    parts = make_parts(8, dtype=codebook_dtype)
    x = random_x(rows, x_dtype)
    out = kernels.vq_experts_forward(x, offsets_of(rows), parts.indices, parts.codebook, backend=backend)
    assert_close(out, float64_projection(x, parts, rows))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_vq_matmul_one_expert_keeps_the_input_dtype(backend, rows):
    parts = make_parts(12, dtype=torch.bfloat16)
    x = random_x([rows], torch.bfloat16)
    out = kernels.vq_matmul(x, parts.indices[2], parts.codebook[2], backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, OC)
    one = VqParts(parts.indices[2:3], parts.codebook[2:3])
    assert_close(out, float64_projection(x, one, [rows]), tolerance=TOLERANCE + 2 ** -8)  # bf16 rounding


DECODE_SEGMENTS = [(0, 0, 1), (2, 1, 3), (3, 3, 6), (1, 6, 14), (0, 14, 25)]  # 1, 2, 3, 8, 11 rows


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("lut", [True, False], ids=["lut", "codebook-gather"])
@pytest.mark.parametrize("bits", [8, 12])
def test_decode_kernels_with_and_without_table(backend, bits, lut, d):
    """The compiled decode kernels on every chunk width, forcing the table on or off (at these small oc
    `use_lut` would always choose the direct gather)."""
    if backend not in ("cpu", "triton"):
        pytest.skip("decode_segments/decode_rows belong to the cpu and triton backends")
    parts = make_parts(bits, oc=67, d=d)
    x = random_x([25])
    expected = torch.empty(25, 67, dtype=torch.float64)
    for expert, start, end in DECODE_SEGMENTS:
        one = VqParts(parts.indices[expert:expert + 1], parts.codebook[expert:expert + 1])
        expected[start:end] = float64_projection(x[start:end], one, [end - start])
    out = torch.zeros(25, 67)
    if backend == "cpu":
        cpu_backend.decode_segments(x, DECODE_SEGMENTS, parts.indices, parts.codebook, out, lut=lut)
    else:
        from kbvq_cli.kernels import triton_backend

        triton_backend.decode_rows(x, DECODE_SEGMENTS, parts.indices, parts.codebook, out, lut=lut)
    assert_close(out, expected)


@pytest.mark.parametrize("d", [2, 4, 8])
@pytest.mark.parametrize("groups", [13, 16, 3], ids=["ragged", "even", "short"])
def test_cpu_single_token_gather_on_any_group_count(d, groups):
    """One-token segments take the 8-wide gather (d = 2, 4): codes in vectors of 8 / d, two output rows at a
    time, with a tail of codes after the last full pair of vectors and an odd last row. Group counts that
    leave a tail (13), none (16) and only a tail (3) all equal float64."""
    require_cpu_kernels()
    ic, oc = groups * d, 67
    parts = make_parts(8, oc=oc, ic=ic, d=d)
    x = random_x([3], ic=ic)
    segments = [(2, 0, 1), (0, 1, 2), (3, 2, 3)]
    expected = torch.cat([float64_projection(x[start:end], VqParts(parts.indices[e:e + 1], parts.codebook[e:e + 1]),
                                             [1]) for e, start, end in segments])
    out = torch.zeros(3, oc)
    cpu_backend.decode_segments(x, segments, parts.indices, parts.codebook, out)
    assert_close(out, expected, tolerance=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bcos", [False, True], ids=["plain", "bcos"])
@pytest.mark.parametrize("side", [None, "input", "output"], ids=["no-basis", "input-side", "output-side"])
@pytest.mark.parametrize("bits,d", [(8, 4), (12, 4), (16, 8), (8, 2), (6, 3)])
def test_fused_decode_projection_matches_float64(bits, d, side, bcos, dtype):
    """The whole projection in one compiled call (`fused_decode`): 16-bit parts read as stored, every chunk
    width (1, 2, 3 and 11 rows), and d off the tuned sizes (3)."""
    require_cpu_kernels()
    from kbvq_cli.kernels import fused_decode

    rows = [1, 0, 3, 11]
    ic = 8 * d * 3
    parts = make_parts(bits, side, bcos, ic=ic, d=d, dtype=dtype)
    x = random_x(rows, ic=ic)
    segments = [(e, start, end) for e, (start, end) in enumerate(zip(offsets_of(rows), offsets_of(rows)[1:]))
                if end > start]
    out = fused_decode.projection(x, parts, segments)
    assert_close(out, float64_projection(x, parts, rows), tolerance=1e-5)


def test_fused_decode_layer_sums_each_token_in_one_order():
    """The routed layer at decode: rows gathered from their tokens, down accumulated into each token with its
    router weight, equal to the float64 formula; the same bits whatever the thread count."""
    require_cpu_kernels()
    from kbvq_cli.kernels import fused_decode

    hidden_size, intermediate = 32, 24
    gate = make_parts(8, "input", bcos=True, oc=intermediate, ic=hidden_size, dtype=torch.bfloat16, seed=2)
    up = make_parts(12, None, oc=intermediate, ic=hidden_size, dtype=torch.float16, seed=3)
    down = make_parts(8, "output", bcos=True, oc=hidden_size, ic=intermediate, dtype=torch.bfloat16, seed=4)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, hidden_size, generator=gen)
    top_k_index = torch.tensor([[0, 2], [2, 4], [3, 2]])  # 4 = a dropped slot
    top_k_weights = torch.rand(3, 2, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            outs.append(fused_decode.moe(hidden, top_k_index, top_k_weights, gate, up, down, functional.silu))
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    expected = torch.zeros(3, hidden_size, dtype=torch.float64)
    for token, choices in enumerate(top_k_index.tolist()):
        for slot, expert in enumerate(choices):
            if expert >= N_EXPERTS:
                continue
            one = lambda p: VqParts(*(None if t is None else t[expert:expert + 1] for t in  # noqa: E731
                                      (p.indices, p.codebook, p.scale, p.shift)),
                                    p.shared_basis, None if p.expert_coeffs is None else p.expert_coeffs[expert:expert + 1],
                                    p.side)
            x = hidden[token:token + 1]
            inner = functional.silu(float64_projection(x, one(gate), [1])) * float64_projection(x, one(up), [1])
            expected[token] += top_k_weights[token, slot].double() * float64_projection(inner, one(down), [1])[0]
    assert_close(outs[0], expected, tolerance=1e-5)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_torch_lookup_table_matmul(bits):
    parts = make_parts(bits, dtype=torch.float32)
    x = random_x([3])
    out = torch_backend.lut_matmul(x, parts.indices[1], parts.codebook[1])
    one = VqParts(parts.indices[1:2], parts.codebook[1:2])
    assert_close(out, float64_projection(x, one, [3]))


@pytest.mark.parametrize("side", [None, "input", "output"], ids=["no-basis", "input-side", "output-side"])
def test_moe_experts_forward_matches_reference_modules(backend, side):
    """The batched layer gives what today's reference modules give, routing and weighting included."""
    hidden_size, intermediate = 32, 24
    gate = make_parts(8, side, bcos=True, oc=intermediate, ic=hidden_size, dtype=torch.float32, seed=2)
    up = make_parts(8, side, bcos=True, oc=intermediate, ic=hidden_size, dtype=torch.float32, seed=3)
    down = make_parts(8, side, oc=hidden_size, ic=intermediate, dtype=torch.float32, seed=4)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, hidden_size, generator=gen)
    top_k_index = torch.tensor([[0, 2], [2, 3], [0, 3], [3, 0], [2, 4], [0, 2], [3, 2]])  # 4 = dropped slot
    top_k_weights = torch.rand(7, 2, generator=gen)
    out = kernels.moe_experts_forward(hidden, top_k_index, top_k_weights, gate, up, down, functional.silu,
                                      backend=backend)

    def module(parts: VqParts) -> VqProjection:
        return VqProjection(parts.indices.long() & 0xFFFF, parts.codebook, parts.scale, parts.shift,
                            parts.shared_basis, parts.expert_coeffs, side=parts.side)

    reference = VqExperts(module(gate), module(up), module(down), functional.silu, N_EXPERTS)
    expected = reference(hidden, top_k_index, top_k_weights)
    assert out.dtype == hidden.dtype
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_group_by_expert_sorts_rows_and_skips_dropped_slots():
    top_k_index = torch.tensor([[2, 0], [0, 5], [2, 1]])  # 5 >= num_experts: a dropped slot
    token, slot, offsets = kernels.group_by_expert(top_k_index, 4)
    assert offsets.tolist() == [0, 2, 3, 5, 5]
    assert list(zip(token.tolist(), slot.tolist())) == [(0, 1), (1, 0), (2, 1), (0, 0), (2, 0)]


def test_backend_resolution(monkeypatch):
    x = torch.zeros(1, IC)
    monkeypatch.setenv("KBVQ_KERNELS", "torch")
    assert resolve_backend(x) == "torch"
    assert resolve_backend(x, "reference") == "reference"  # the argument wins over the variable
    monkeypatch.setenv("KBVQ_KERNELS", "fastest")
    with pytest.raises(ValueError, match="unknown kbvq kernels backend"):
        resolve_backend(x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend(x, "triton")
    monkeypatch.delenv("KBVQ_KERNELS")
    monkeypatch.setattr(cpu_backend, "available", lambda: True)
    assert resolve_backend(x) == "cpu"
    monkeypatch.setattr(cpu_backend, "available", lambda: False)
    with pytest.warns(RuntimeWarning, match="pure-torch"):
        assert resolve_backend(x) == "torch"


def test_bad_inputs_are_refused():
    parts = make_parts(8)
    x = random_x([3, 0, 0, 1])
    with pytest.raises(ValueError, match="offsets end at row"):
        kernels.vq_experts_forward(x, [0, 3, 3, 3, 3], parts.indices, parts.codebook, backend="torch")
    with pytest.raises(ValueError, match="offsets end at row 0"):
        kernels.vq_experts_forward(x, [0, 0, 0, 0, 0], parts.indices, parts.codebook, backend="torch")
    with pytest.raises(ValueError, match="never decrease"):
        kernels.vq_experts_forward(x, [0, 3, 2, 4, 4], parts.indices, parts.codebook, backend="torch")
    with pytest.raises(TypeError, match="uint8 or torch.int16"):
        kernels.vq_experts_forward(x, [0, 3, 3, 3, 4], parts.indices.int(), parts.codebook, backend="torch")
    with pytest.raises(ValueError, match="scale has shape"):
        VqParts(parts.indices, parts.codebook, scale=torch.zeros(N_EXPERTS, OC + 1))


def test_cpu_kernels_report_why_they_cannot_load(monkeypatch):
    """Without a working compiler the library is reported unavailable with the reason (and `auto` falls back)."""
    build = cpu_backend._load.__wrapped__  # the uncached loader
    monkeypatch.setattr(cpu_backend, "_compiler", lambda: None)
    assert build() == (None, "no C++ compiler found (set CXX, or install g++)")
    monkeypatch.setattr(cpu_backend, "_compiler", lambda: shutil.which("false") or "/bin/false")
    library, reason = build()
    assert library is None and "failed to build cpu_kernels.cpp" in reason


def test_cpu_decode_refuses_arguments_its_pointers_would_overrun():
    require_cpu_kernels()
    parts = make_parts(8)
    x, out = random_x([3]), torch.zeros(3, OC)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_backend.decode_segments(x.double(), [(0, 0, 3)], parts.indices, parts.codebook, out)
    with pytest.raises(ValueError, match="outside"):
        cpu_backend.decode_segments(x, [(0, 0, 4)], parts.indices, parts.codebook, out)
    with pytest.raises(ValueError, match="outside"):
        cpu_backend.decode_segments(x, [(N_EXPERTS, 0, 3)], parts.indices, parts.codebook, out)


@pytest.mark.skipif(INTERPRETING, reason="this is the interpreter run")
def test_triton_backend_under_interpreter():
    """Run this file's triton cases in a child whose triton is imported with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
               "-k", "triton and not under_interpreter"]
    done = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
