"""`kbvq klt-svd` end to end on tiny models: shards, options, and the residual handed to vq."""

import pytest
import torch

from cli_util import invoke
from kbvq_cli.experts import layer_experts
from kbvq_cli.model_files import ModelSource
from stages.klt_svd.reader import KltSvd

def calibrated_run(model_dir, calib_text, run_dir):
    invoke("calibrate", "--model", model_dir, "--data", calib_text, "--samples", 4, "--seqlen", 32, "--run", run_dir)
    return run_dir


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v2", "mixtral"])
def test_klt_svd_writes_parts_that_reconstruct(model_type, tiny_model_dir, calib_text, tmp_path):
    model_dir = tiny_model_dir(model_type)
    run = calibrated_run(model_dir, calib_text, tmp_path / "run")
    invoke("klt-svd", "--run", run, "--rank", 4)
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
    invoke("klt-svd", "--run", run, "--rank", 0)
    parts = KltSvd(run).layer(0)
    assert parts.share("gate", 0).abs().max() == 0
    refused = invoke("klt-svd", "--run", run, "--rank", 2, "--down", "output", code=2)
    assert "--restart" in refused.output
    invoke("klt-svd", "--run", run, "--rank", 2, "--down", "output", "--no-klt", "--restart")
    parts = KltSvd(run).layer(0)
    assert parts.parts["down"].side == "output" and parts.parts["gate"].klt is False
    assert parts.tensors["down.shared_basis"].shape == (2, 64)


def test_klt_svd_needs_calibration(tmp_path):
    result = invoke("klt-svd", "--run", tmp_path / "empty", code=2)
    assert "stage calibrate has not been run" in result.output
