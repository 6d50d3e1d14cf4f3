"""The reported output errors: float32 products with float64 sums stay within 1e-5 of the float64 values."""

import pytest
import torch

from kbvq_cli.output_error import output_error, relative_output_error, relative_output_errors


def test_fast_relative_errors_equal_the_float64_reference():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 160, generator=generator, dtype=torch.float64)
    inputs = torch.randn(4096, 160, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 160)
    second = inputs.T @ inputs / inputs.shape[0]
    approxes = [weight + 0.05 * torch.randn_like(weight), weight * 0.9, torch.zeros_like(weight)]
    fast = relative_output_errors(weight.float(), [a.float() for a in approxes], second.float())
    for value, approx in zip(fast, approxes):
        exact = float(output_error(weight - approx, second) / output_error(weight, second))
        assert abs(value - exact) <= 1e-5 * exact
    assert fast[2] == 1.0 or abs(fast[2] - 1.0) < 1e-6  # replacing W by 0 loses all of its output energy
    assert relative_output_error(weight.float(), approxes[0].float(), second.float()) == fast[0]


def test_vq_backend_auto_resolves_to_faiss_on_the_cpu_and_torch_stays_torch():
    from stages.vq.config import VqSettings
    from stages.vq.stage import concrete_backend

    assert VqSettings().backend == "auto"
    assert concrete_backend(VqSettings(device="cpu")).backend == "faiss"
    assert concrete_backend(VqSettings(backend="torch", device="cpu")).backend == "torch"


def test_vq_output_errors_take_about_one_product_per_projection():
    """Per projection the stage's two reported errors and the output energy cost together about one
    `[oc, ic] @ [ic, ic]` product's multiply-adds (two quadratic forms from C's upper block triangle;
    the issue-13 code took four float64 products), counted on every matmul torch runs along an inner
    dimension of oc while one expert is quantized."""
    import sys
    from pathlib import Path

    from torch.overrides import TorchFunctionMode

    from stages.vq.backends import make_backend
    from stages.vq.config import VqSettings
    from stages.vq.stage import quantize_group

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_vq import expert_inputs

    generator = torch.Generator().manual_seed(3)
    weights = {"gate": torch.randn(24, 32, generator=generator), "up": torch.randn(24, 32, generator=generator),
               "down": torch.randn(32, 24, generator=generator)}
    experts, parts, stats = expert_inputs(32, 24, weights, tokens=256)
    work = {24: 0, 32: 0}  # multiply-adds of products along the matrix's output dim (gate and up: 24, down: 32)

    class CountProducts(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm") and args[0].dim() == 2 \
                    and args[1].dim() == 2 and args[0].shape[1] in work:
                work[args[0].shape[1]] += args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
            return func(*args, **(kwargs or {}))

    settings = VqSettings(bits=2, dim=2, iters=2, backend="faiss", device="cpu")
    with CountProducts():
        (unit, meta), = quantize_group(experts, parts, stats, 0, [0], settings, make_backend("faiss"))
    one_product = {24: 24 * 32 * 32, 32: 32 * 24 * 24}
    assert 0 < work[24] <= 2 * 1.15 * one_product[24]  # gate and up
    assert 0 < work[32] <= 1.15 * one_product[32]
    assert set(meta.output_error) == {"gate", "up", "down"}


def test_quadratic_trace_from_the_upper_block_triangle_equals_the_float64_trace():
    from kbvq_cli.output_error import quadratic_trace

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(30, 50, generator=generator, dtype=torch.float64)
    inputs = torch.randn(400, 50, generator=generator, dtype=torch.float64)
    second = inputs.T @ inputs
    for panels in (1, 3, 8, 50):
        assert abs(float(quadratic_trace(x.float(), second.float(), panels)) / float(output_error(x, second)) - 1) < 1e-5


@pytest.mark.parametrize("rank", [0, 3])
def test_vq_output_errors_equal_the_float64_reference(rank):
    from kbvq_cli.output_error import vq_output_errors

    generator = torch.Generator().manual_seed(5)
    oc, ic = 80, 144
    inputs = torch.randn(4096, ic, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, ic) + 0.2
    second = inputs.T @ inputs / inputs.shape[0]
    left = torch.randn(oc, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, ic, generator=generator, dtype=torch.float64)
    share = left @ right
    residual = torch.randn(oc, ic, generator=generator, dtype=torch.float64)
    approx = residual + 0.3 * torch.randn(oc, ic, generator=generator, dtype=torch.float64)
    weight = share + residual
    before, after = vq_output_errors(residual.float(), approx.float(), (left.float(), right.float()) if rank else None,
                                     second.float())
    energy = output_error(weight, second)
    assert abs(before - float(output_error(residual, second) / energy)) <= 1e-5 * before
    assert abs(after - float(output_error(residual - approx, second) / energy)) <= 1e-5 * after
