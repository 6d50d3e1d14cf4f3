"""The command line: fast help, and a clear one-line error for every kind of bad input."""

import json
import subprocess
import sys

import pytest
import yaml

from cli_util import run_cli


def assert_one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # one line, and the last thing printed (a progress bar may precede an error found mid-stage)
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in result.output


def test_help_lists_stages_without_importing_torch():
    code = ("import sys; from kbvq_cli.app import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("calibrate", "klt-svd", "vq", "bcos", "pack", "eval", "run"):
        assert command in out
    assert "HEAVY []" in out


def test_unknown_architecture_is_refused_by_name(tmp_path, calib_text):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    result = run_cli("calibrate", "--model", model, "--data", calib_text, "--run", tmp_path / "run")
    assert_one_line_error(result, "architecture 'llama' is not supported; supported: deepseek_v2, mixtral")


def test_missing_model_directory(tmp_path):
    result = run_cli("calibrate", "--model", tmp_path / "nope", "--run", tmp_path / "run")
    assert_one_line_error(result, "is not a directory")


def test_hub_id_offline_says_to_pass_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("calibrate", "--model", "Qwen/Qwen1.5-MoE-A2.7B", "--run", tmp_path / "run")
    assert_one_line_error(result, "pass a local model directory instead")


def test_bits_out_of_range(tmp_path):
    result = run_cli("vq", "--run", tmp_path / "run", "--bits", "5")
    assert_one_line_error(result, "bits=5 is out of range for dim 4; valid: bits 2 or 3 with dim 4")


def test_recipe_with_unknown_key_and_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\nvq: {bitz: 2}\n")
    assert_one_line_error(run_cli("run", "--recipe", recipe, "--dry-run"), "unknown setting(s) bitz")
    recipe.write_text("model: [unclosed\n")
    assert_one_line_error(run_cli("run", "--recipe", recipe, "--dry-run"), "is not valid YAML")


def test_dry_run_validates_and_prints_the_plan(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "some/model", "vq": {"bits": 3}}))
    result = run_cli("run", "--recipe", recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "bits=3" in result.output and "calibrate:" in result.output


def test_too_little_calibration_text(tiny_model_dir, calib_text, tmp_path):
    result = run_cli("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text,
                    "--samples", 100000, "--seqlen", 64, "--run", tmp_path / "run")
    assert_one_line_error(result, "lower --samples or --seqlen")


def test_changed_recipe_under_existing_run_is_refused(tiny_model_dir, calib_text, tmp_path):
    args = ["calibrate", "--model", tiny_model_dir("olmoe"), "--data", calib_text, "--seqlen", 32,
            "--run", tmp_path / "run"]
    assert run_cli(*args, "--samples", 4).exit_code == 0
    assert_one_line_error(run_cli(*args, "--samples", 5), "made with other settings (samples: 4 -> 5); pass --restart")
    result = run_cli(*args, "--samples", 5, "--restart")
    assert result.exit_code == 0, result.output


def test_default_run_directory_is_named_after_the_model(tiny_model_dir, calib_text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model_dir("mixtral")
    result = run_cli("calibrate", "--model", model, "--data", calib_text, "--samples", 2, "--seqlen", 16)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / model.name
    assert (run / "calibrate" / "manifest.json").exists()
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["calibrate"]["samples"] == 2 and saved["model"] == str(model)


def test_finished_stage_is_not_redone(tiny_model_dir, calib_text, tmp_path):
    args = ["calibrate", "--model", tiny_model_dir("olmoe"), "--data", calib_text, "--samples", 2,
            "--seqlen", 16, "--run", tmp_path / "run"]
    assert run_cli(*args).exit_code == 0
    again = run_cli(*args)
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.parametrize("spec", ["missing.txt", "./nowhere/"])
def test_missing_local_data(spec, tiny_model_dir, tmp_path):
    result = run_cli("calibrate", "--model", tiny_model_dir("olmoe"), "--data", tmp_path / spec,
                    "--run", tmp_path / "run")
    assert_one_line_error(result, "does not exist")


def test_corrupt_upstream_shard_is_reported_not_used(tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    assert run_cli("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--samples", 2,
                  "--seqlen", 16, "--run", run).exit_code == 0
    shard = run / "calibrate" / "layer_001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_cli("klt-svd", "--run", run), "layer_001.safetensors")
    assert not (run / "klt-svd" / "layer_001.safetensors").exists()


def test_unfinished_upstream_is_refused(tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    assert run_cli("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--samples", 2,
                  "--seqlen", 16, "--run", run).exit_code == 0
    manifest = run / "calibrate" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    assert_one_line_error(run_cli("vq", "--run", run), "is unfinished; rerun `kbvq calibrate")
    assert_one_line_error(run_cli("klt-svd", "--run", run), "calibrate in")


def test_cuda_without_a_gpu_is_a_clear_error(tiny_model_dir, calib_text, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_cli("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--device", "cuda",
                    "--run", tmp_path / "run")
    assert_one_line_error(result, "no CUDA device is visible; use --device cpu")
