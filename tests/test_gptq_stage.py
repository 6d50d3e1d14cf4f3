"""`gptq` end to end on a tiny qwen2_moe model: calibrate -> gptq / rtn, with no klt-svd in between.

The stage is not in the registry yet, so these tests call `stages.gptq.stage.run` with a ResolvedStage
built by hand instead of through `kbvq gptq`.
"""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import PROJECTIONS, SHARED, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage, load_recipe
from kbvq_cli.settings import parse_settings
from resume_util import shard_hashes
from stages.calibrate.reader import CalibLayerMeta, Calibration, CalibrationLayer
from stages.gptq.config import GptqSettings
from stages.gptq.reader import GptqCodes
from stages.gptq.stage import expert_hessian, run
from kbvq_cli.output_error import relative_output_error

LAYERS, EXPERTS = (0, 1), list(range(8)) + [SHARED]


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, calib_text, tmp_path_factory):
    """A run directory with calibrate done (16 x 64 tokens), copied by each test that writes into it."""
    run_dir = tmp_path_factory.mktemp("gptq") / "calibrated"
    result = CliRunner().invoke(app, ["calibrate", "--model", str(tiny_model_dir("qwen2_moe")), "--data",
                                      str(calib_text), "--samples", "16", "--seqlen", "64", "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    return run_dir


def copy_run(calibrated, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(calibrated, target)
    return target


def gptq(run_dir, restart=False, **settings) -> dict:
    recipe = load_recipe(run_dir / "recipe.yaml")
    resolved = ResolvedStage(run_dir=run_dir, model=recipe.model, recipe=recipe,
                             settings=parse_settings(GptqSettings, {"device": "cpu", **settings}, "gptq settings"))
    return run(resolved, restart=restart)


def output_errors(run_dir) -> dict[str, list[float]]:
    codes = GptqCodes(run_dir)
    return {p: [codes.metadata(i, e).output_error[p] for i in LAYERS for e in EXPERTS] for p in PROJECTIONS}


def test_gptq_beats_rtn_per_projection_and_units_reconstruct(calibrated, tmp_path):
    rtn_run, gptq_run = copy_run(calibrated, tmp_path, "rtn"), copy_run(calibrated, tmp_path, "gptq")
    rtn_summary = gptq(rtn_run, method="rtn", group_size=32)
    gptq_summary = gptq(gptq_run, group_size=32)
    assert gptq_summary["units"] == rtn_summary["units"] == len(LAYERS) * len(EXPERTS)
    assert gptq_summary["starved"] == [] and gptq_summary["bits_per_expert_weight"] > 2.25  # groups of 32: 3.0
    rtn_errors, gptq_errors = output_errors(rtn_run), output_errors(gptq_run)
    for projection in PROJECTIONS:
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        assert mean(gptq_errors[projection]) < mean(rtn_errors[projection]), projection
    assert gptq_summary["mean_relative_output_error"] < rtn_summary["mean_relative_output_error"]
    # the stored error is the one of what the reader dequantizes, under the expert's own second moment
    codes, source = GptqCodes(gptq_run), ModelSource(str(load_recipe(gptq_run / "recipe.yaml").model))
    experts, stats = layer_experts(source, 1), Calibration(gptq_run).layer(1)
    for expert in (0, SHARED):
        unit = codes.expert(1, expert)
        for projection in PROJECTIONS:
            weight = experts.matrix(projection, expert)
            oc, ic = weight.shape
            q = unit.matrices[projection]
            assert q.codes.dtype == torch.uint8 and q.codes.shape == (oc, ic)
            assert q.scale.dtype == torch.float16
            assert q.zero.shape == (oc, -(-ic // 32))  # shared down: ic 48, groups 32 + 16
            second = stats.expert_input(projection, expert, experts.shared_path).second_moment()
            error = relative_output_error(weight, unit.matrix(projection), second)
            assert error == pytest.approx(codes.metadata(1, expert).output_error[projection], rel=1e-9)


def test_rerun_is_a_no_op_and_fresh_runs_are_bit_identical(calibrated, tmp_path):
    first, second = copy_run(calibrated, tmp_path, "first"), copy_run(calibrated, tmp_path, "second")
    summary = gptq(first, bits=3, group_size=16, act_order=True)
    manifest = (first / "gptq" / "manifest.json").read_bytes()
    stamps = {path.name: path.stat().st_mtime_ns for path in (first / "gptq").iterdir()}
    assert gptq(first, bits=3, group_size=16, act_order=True) == summary
    assert (first / "gptq" / "manifest.json").read_bytes() == manifest
    assert {path.name: path.stat().st_mtime_ns for path in (first / "gptq").iterdir()} == stamps
    gptq(second, bits=3, group_size=16, act_order=True)
    assert shard_hashes(first / "gptq") == shard_hashes(second / "gptq")
    group_index = GptqCodes(first).expert(0, 3).matrices["gate"].group_index
    assert group_index.dtype == torch.int32 and group_index.shape == (64,)
    assert load_recipe(first / "recipe.yaml").model is not None  # saving the run recipe kept it readable
    with pytest.raises(KbvqError, match="--restart"):
        gptq(first, bits=2, group_size=16, act_order=True)


def test_resume_redoes_only_the_missing_experts(calibrated, tmp_path):
    straight, resumed = copy_run(calibrated, tmp_path, "straight"), copy_run(calibrated, tmp_path, "resumed")
    gptq(straight, group_size=16)
    gptq(resumed, group_size=16)
    path = resumed / "gptq" / "manifest.json"
    manifest = json.loads(path.read_text())  # as a kill after the first layer and two experts leaves it
    for name in sorted(manifest["units"])[len(EXPERTS) + 2:]:
        del manifest["units"][name]
    manifest["complete"], manifest["summary"] = False, {}
    path.write_text(json.dumps(manifest))
    kept = {name: (resumed / "gptq" / f"{name}.safetensors").stat().st_mtime_ns for name in manifest["units"]}
    gptq(resumed, group_size=16)
    assert shard_hashes(resumed / "gptq") == shard_hashes(straight / "gptq")
    assert {name: (resumed / "gptq" / f"{name}.safetensors").stat().st_mtime_ns for name in kept} == kept


def test_starved_experts_use_the_pooled_second_moments(calibrated):
    layer = Calibration(calibrated).layer(0)
    own, starved = expert_hessian(layer, "down", 2, None)
    assert not starved and own.dtype == torch.float64
    tensors = dict(layer.tensors)
    tensors["experts.gate_up.count"] = tensors["experts.gate_up.count"].clone()
    tensors["experts.gate_up.count"][2] = 0  # routed no tokens
    for name in ("sum_xxT", "variance", "correlation"):  # as if calibrated with expert_second_moments: false
        tensors.pop(f"experts.down.{name}", None)
    hollow = CalibrationLayer(0, tensors, CalibLayerMeta(0, True, layer.inputs))
    gate, starved = expert_hessian(hollow, "gate", 2, None)
    assert starved and torch.equal(gate, layer.input_moments("block").second_moment())
    down, starved = expert_hessian(hollow, "down", 5, None)
    assert starved and torch.equal(down, layer.pooled_down_second_moment())
    assert not expert_hessian(hollow, "up", 5, None)[1]
