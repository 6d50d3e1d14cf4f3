"""GPTQ-style error feedback for VQ (the GPTVQ baseline): exact against a float64 reference, the nearest
codeword when inputs are uncorrelated, and a lower output error than nearest-codeword assignment."""

import pytest
import torch
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.stage_dir import StageDir
from stages.vq.core import dequantize
from stages.vq.error_feedback import error_feedback_assign


def problem(seed: int, oc=24, ic=32, k=16, d=4):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(oc, ic, generator=generator)
    mixing = torch.eye(ic) + torch.randn(ic, ic, generator=generator) / ic ** 0.5
    inputs = torch.randn(512, ic, generator=generator) @ mixing
    codebook = torch.randn(k, d, generator=generator)
    return weight, (inputs.T @ inputs).double(), codebook


def output_error(weight, indices, codebook, hessian):
    error = (weight - dequantize(indices, codebook, weight.shape)).double()
    return float(torch.trace(error @ hessian @ error.T))


def reference(weight, codebook, hessian, damp=0.01):
    """Textbook float64 version: the whole inverse Hessian, no blocks, one group of d columns at a time."""
    w, c = weight.double().clone(), codebook.double()
    h = hessian.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    d = c.shape[1]
    out = []
    for g in range(0, w.shape[1], d):
        local = torch.linalg.inv(factor[g:g + d, g:g + d])
        distance = ((w[:, None, g:g + d] - c[None]) @ local).pow(2).sum(-1)
        chosen = distance.argmin(1)
        out.append(chosen)
        error = (w[:, g:g + d] - c[chosen]) @ local
        w[:, g + d:] -= error @ factor[g:g + d, g + d:]
    return torch.stack(out, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [4, 8, 128])
def test_equals_the_float64_reference(seed, block_size):
    weight, hessian, codebook = problem(seed)
    got = error_feedback_assign(weight, codebook, hessian, block_size=block_size)
    assert torch.equal(got, reference(weight, codebook, hessian))


def test_uncorrelated_inputs_give_the_nearest_codeword():
    weight, _, codebook = problem(0)
    got = error_feedback_assign(weight, codebook, torch.eye(weight.shape[1], dtype=torch.float64) * 3.0)
    brute = ((weight.reshape(-1, 1, 4) - codebook[None]) ** 2).sum(-1).argmin(1).reshape(weight.shape[0], -1)
    assert torch.equal(got, brute)


@pytest.mark.parametrize("seed", range(4))
def test_lower_output_error_than_nearest_assignment(seed):
    weight, hessian, codebook = problem(seed)
    nearest = ((weight.reshape(-1, 1, 4) - codebook[None]) ** 2).sum(-1).argmin(1).reshape(weight.shape[0], -1)
    feedback = error_feedback_assign(weight, codebook, hessian)
    assert output_error(weight, feedback, codebook, hessian) < 0.95 * output_error(weight, nearest, codebook, hessian)


def test_dead_inputs_are_handled():
    weight, hessian, codebook = problem(1)
    hessian[:, 5] = 0
    hessian[5, :] = 0
    assert error_feedback_assign(weight, codebook, hessian).shape == (24, 8)


def test_stage_with_error_feedback_lowers_the_output_error(tiny_model_dir, calib_text, tmp_path):
    runner = CliRunner()
    errors = {}
    for name, flag in (("plain", "--no-error-feedback"), ("feedback", "--error-feedback")):
        run = tmp_path / name
        for args in (("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--samples", 8,
                      "--seqlen", 64), ("klt-svd", "--rank", 0), ("vq", "--iters", 5, flag)):
            result = runner.invoke(app, [str(a) for a in (*args, "--run", run)])
            assert result.exit_code == 0, result.output
        errors[name] = StageDir.open_finished(run, "vq").manifest["summary"]["mean_relative_output_error"]
    assert errors["feedback"] < errors["plain"]
