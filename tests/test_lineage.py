"""One run, one lineage: a run directory holds the stages of one model, and a refused command changes nothing.

Through the CLI, on tiny models of two architectures (qwen2_moe and mixtral have the same hidden size,
so nothing downstream would notice a mix by its shapes).
"""

import hashlib
import json

import yaml
from typer.testing import CliRunner

from kbvq_cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[-1]


def snapshot(run) -> dict[str, str]:
    """Every file under the run and the sha256 of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def recorded_model(run, stage) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())["inputs"]["model"]


def calibrate(model, run, calib_text, *extra):
    return invoke("calibrate", "--model", model, "--run", run, "--data", calib_text, "--samples", 4, "--seqlen", 32,
                  "--device", "cpu", *extra)


def test_calibrating_another_model_into_a_run_is_refused_and_changes_nothing(tiny_model_dir, calib_text, tmp_path):
    qwen, mixtral, run = tiny_model_dir("qwen2_moe"), tiny_model_dir("mixtral"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    before = snapshot(run)

    error = one_line_error(invoke("calibrate", "--model", mixtral, "--run", run))
    assert error == (f"error: {run} was calibrated on {qwen} (qwen2_moe); this command names {mixtral} (mixtral); "
                     f"use another --run")
    assert snapshot(run) == before
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"] == str(qwen)

    ok("klt-svd", "--run", run, "--rank", 2)
    assert recorded_model(run, "klt-svd") == recorded_model(run, "calibrate")


def test_restart_of_a_later_stage_keeps_the_runs_model(tiny_model_dir, calib_text, tmp_path):
    qwen, mixtral, run = tiny_model_dir("qwen2_moe"), tiny_model_dir("mixtral"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    ok("klt-svd", "--run", run, "--rank", 2)
    ok("vq", "--run", run, "--iters", 2)
    one_line_error(invoke("calibrate", "--model", mixtral, "--run", run))

    ok("vq", "--run", run, "--iters", 2, "--restart")
    assert recorded_model(run, "vq") == recorded_model(run, "calibrate")

    # A recipe naming the other model cannot re-point the run either, restart or not.
    other = tmp_path / "mixtral.yaml"
    other.write_text(yaml.safe_dump({"model": str(mixtral)}))
    before = snapshot(run)
    for extra in ((), ("--restart",)):
        error = one_line_error(invoke("vq", "--run", run, "--iters", 2, "--recipe", other, *extra))
        assert error == (f"error: {run} was calibrated on {qwen} (qwen2_moe); this command names {mixtral} "
                         f"(mixtral); use another --run")
    assert snapshot(run) == before


def test_an_explicit_calibrate_restart_repoints_the_run_and_later_stages_say_so(tiny_model_dir, calib_text, tmp_path):
    qwen, mixtral, run = tiny_model_dir("qwen2_moe"), tiny_model_dir("mixtral"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    ok("klt-svd", "--run", run, "--rank", 2)
    assert calibrate(mixtral, run, calib_text, "--restart").exit_code == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"] == str(mixtral)

    error = one_line_error(invoke("klt-svd", "--run", run, "--rank", 2))
    assert error.startswith(f"error: klt-svd in {run} was made from {qwen} (qwen2_moe); this command names "
                            f"{mixtral} (mixtral) (also: calibrate has been redone since); pass --restart")
    error = one_line_error(invoke("vq", "--run", run, "--iters", 2))
    assert error.startswith(f"error: klt-svd in {run} was made from {qwen} (qwen2_moe); this command names "
                            f"{mixtral} (mixtral); redo klt-svd first")
    assert not (run / "vq").exists()
    ok("klt-svd", "--run", run, "--rank", 2, "--restart")
    ok("vq", "--run", run, "--iters", 2)
    assert recorded_model(run, "vq") == recorded_model(run, "calibrate") == recorded_model(run, "klt-svd")


def test_a_stage_built_on_an_earlier_calibration_is_refused_downstream(tiny_model_dir, calib_text, tmp_path):
    qwen, run = tiny_model_dir("qwen2_moe"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    ok("klt-svd", "--run", run, "--rank", 2)
    assert calibrate(qwen, run, calib_text, "--samples", 5, "--restart").exit_code == 0
    error = one_line_error(invoke("vq", "--run", run, "--iters", 2))
    assert error == (f"error: klt-svd in {run} was made from an earlier calibrate (calibrate has been redone "
                     f"since); redo klt-svd first: `kbvq klt-svd --run {run} --restart`")
    assert not (run / "vq").exists()


def test_changed_settings_are_named_in_words(tiny_model_dir, calib_text, tmp_path):
    qwen, run = tiny_model_dir("qwen2_moe"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    ok("klt-svd", "--run", run, "--rank", 2)
    ok("vq", "--run", run, "--iters", 2)
    before = snapshot(run)
    error = one_line_error(invoke("vq", "--run", run, "--iters", 3, "--bits", 3))
    assert error == (f"error: vq in {run / 'vq'} was made with other settings (bits: 2 -> 3; iters: 2 -> 3); "
                     f"pass --restart to redo it, or use another --run directory")
    assert snapshot(run) == before


def test_eval_of_a_runs_pack_under_a_recipe_naming_another_model_is_refused(tiny_model_dir, calib_text, tmp_path):
    qwen, mixtral, run = tiny_model_dir("qwen2_moe"), tiny_model_dir("mixtral"), tmp_path / "run"
    assert calibrate(qwen, run, calib_text).exit_code == 0
    for stage in (("klt-svd", "--rank", 2), ("vq", "--iters", 2), ("bcos",), ("pack",)):
        ok(stage[0], "--run", run, *stage[1:])
    other = tmp_path / "mixtral.yaml"
    other.write_text(yaml.safe_dump({"model": str(mixtral)}))
    before = snapshot(run)
    error = one_line_error(invoke("eval", "--run", run, "--recipe", other, "--tasks", ""))
    assert error == (f"error: {run} was calibrated on {qwen} (qwen2_moe); this command names {mixtral} (mixtral); "
                     f"use another --run")
    assert snapshot(run) == before
