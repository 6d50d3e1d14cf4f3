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


def test_vq_takes_two_output_error_products_per_projection():
    """Per projection the stage takes exactly two `[oc, ic] @ [ic, ic]` products for its two reported
    errors and the output energy (`vq_output_errors`; the issue-13 code took four float64 ones), counted
    on every matmul torch runs while one expert is quantized."""
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
    products = []

    class CountProducts(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm") and args[1].dim() == 2 \
                    and args[1].shape[0] == args[1].shape[1] == args[0].shape[-1] and args[0].shape[0] in (24, 32):
                products.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    settings = VqSettings(bits=2, dim=2, iters=2, backend="faiss", device="cpu")
    with CountProducts():
        (unit, meta), = quantize_group(experts, parts, stats, 0, [0], settings, make_backend("faiss"))
    assert products == [((24, 32), (32, 32))] * 4 + [((32, 24), (24, 24))] * 2
    assert set(meta.output_error) == {"gate", "up", "down"}


@pytest.mark.parametrize("rank", [0, 3])
def test_vq_output_errors_from_two_products_equal_the_float64_reference(rank):
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
    before, after = vq_output_errors(residual.float(), approx.float(), share.float() if rank else None,
                                     (left.float(), right.float()) if rank else None, second.float())
    energy = output_error(weight, second)
    assert abs(before - float(output_error(residual, second) / energy)) <= 1e-5 * before
    assert abs(after - float(output_error(residual - approx, second) / energy)) <= 1e-5 * after
