"""Batched k-means (several experts at once, the GPU path) equals the one-expert path."""

import torch
from typer.testing import CliRunner

from kbvq_cli.app import app
from stages.vq.backends import TorchBackend
from stages.vq.batched import kmeans_batched
from stages.vq.core import kmeans


def test_batched_equals_one_by_one():
    generator = torch.Generator().manual_seed(3)
    points = (torch.randn(3, 2048, 4, generator=generator) * 0.02).contiguous()
    codebooks, indices, objective, _ = kmeans_batched(points, 64, 15, 42)
    for e in range(3):
        codebook, single_indices, single_objective, _ = kmeans(points[e], 64, 15, 42, TorchBackend())
        assert (indices[e] == single_indices).float().mean() > 0.999
        assert abs(objective[-1][e] - single_objective[-1]) <= 1e-4 * single_objective[-1]
        torch.testing.assert_close(codebooks[e], codebook, rtol=1e-4, atol=1e-6)


def test_vq_stage_with_torch_backend_batches_experts(tiny_model_dir, calib_text, tmp_path):
    runner = CliRunner()
    run = str(tmp_path / "run")
    for args in (["calibrate", "--model", str(tiny_model_dir("olmoe")), "--data", str(calib_text), "--samples", "4",
                  "--seqlen", "32", "--run", run], ["klt-svd", "--run", run, "--rank", "1"],
                 ["vq", "--run", run, "--backend", "torch", "--iters", "5", "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    manifest = (tmp_path / "run" / "vq" / "manifest.json").read_text()
    assert '"complete": true' in manifest and "expert_007" in manifest
