"""The reported output errors: float32 products with float64 sums stay within 1e-5 of the float64 values."""

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


def test_vq_computes_each_expert_metric_once(monkeypatch):
    """Per projection the stage takes exactly three `oc x ic x ic` products: the output energy once, the
    error with the shared part alone and with VQ (the issue-13 code took four float64 ones and the
    energy twice). Counted on `_fast_trace`, the one place such a product is taken."""
    import sys
    from pathlib import Path

    from kbvq_cli import output_error as module
    from stages.vq.backends import make_backend
    from stages.vq.config import VqSettings
    from stages.vq.stage import quantize_group

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_vq import expert_inputs

    generator = torch.Generator().manual_seed(3)
    weights = {"gate": torch.randn(24, 32, generator=generator), "up": torch.randn(24, 32, generator=generator),
               "down": torch.randn(32, 24, generator=generator)}
    experts, parts, stats = expert_inputs(32, 24, weights, tokens=256)
    calls, fast_trace = [], module._fast_trace
    monkeypatch.setattr(module, "_fast_trace", lambda error, c: calls.append(tuple(error.shape)) or fast_trace(error, c))
    settings = VqSettings(bits=2, dim=2, iters=2, backend="faiss", device="cpu")
    (unit, meta), = quantize_group(experts, parts, stats, 0, [0], settings, make_backend("faiss"))
    assert calls == [(24, 32)] * 3 + [(24, 32)] * 3 + [(32, 24)] * 3
    assert set(meta.output_error) == {"gate", "up", "down"}
