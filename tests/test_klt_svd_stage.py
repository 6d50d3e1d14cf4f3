"""`kbvq klt-svd` end to end on tiny models: shards, options, and the residual handed to vq."""

import pytest
import torch
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.experts import layer_experts
from kbvq_cli.model_files import ModelSource
from stages.klt_svd.reader import KltSvd

runner = CliRunner()


def calibrated_run(model_dir, calib_text, run_dir):
    result = runner.invoke(app, ["calibrate", "--model", str(model_dir), "--data", str(calib_text),
                                 "--samples", "4", "--seqlen", "32", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_klt_svd_writes_parts_that_reconstruct(model_type, tiny_model_dir, calib_text, tmp_path):
    model_dir = tiny_model_dir(model_type)
    run = calibrated_run(model_dir, calib_text, tmp_path / "run")
    result = runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "4"])
    assert result.exit_code == 0, result.output
    klt = KltSvd(run)
    source = ModelSource(str(model_dir))
    for index in klt.layers():
        parts, experts = klt.layer(index), layer_experts(source, index)
        assert parts.parts["gate"].rank == 4 and parts.parts["down"].side == "input"
        for projection in ("gate", "up", "down"):
            for expert in experts.expert_ids():
                weight = experts.matrix(projection, expert)
                share = parts.share(projection, expert)
                assert share is not None and share.shape == weight.shape
                torch.testing.assert_close(share + parts.residual(projection, expert, weight), weight)
                assert parts.residual(projection, expert, weight).norm() < weight.norm()
        if experts.shared:
            assert "shared.down" in parts.parts


def test_rank_zero_and_down_options(tiny_model_dir, calib_text, tmp_path):
    run = calibrated_run(tiny_model_dir("qwen3_moe"), calib_text, tmp_path / "run")
    assert runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "0"]).exit_code == 0
    parts = KltSvd(run).layer(0)
    assert parts.share("gate", 0).abs().max() == 0
    refused = runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "2", "--down", "output"])
    assert refused.exit_code == 2 and "--restart" in refused.output
    redo = runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "2", "--down", "output", "--no-klt",
                               "--restart"])
    assert redo.exit_code == 0, redo.output
    parts = KltSvd(run).layer(0)
    assert parts.parts["down"].side == "output" and parts.parts["gate"].klt is False
    assert parts.tensors["down.shared_basis"].shape == (2, 64)


def test_klt_svd_needs_calibration(tmp_path):
    result = runner.invoke(app, ["klt-svd", "--run", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "stage calibrate has not been run" in result.output
