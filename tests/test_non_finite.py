"""A NaN/inf weight is refused where it is read, naming the tensor and file; non-finite calibration
statistics are refused by calibrate's reader, naming the layer (not klt-svd's "overflows float16")."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kbvq_cli.app import app
from tiny_models import build_tiny_model

runner = CliRunner()
UP = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def clean_model(tmp_path_factory):
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("clean") / "model")


def edited_copy(clean_model, directory, edit):
    """A copy of the tiny model with `edit(weights)` applied to its safetensors file."""
    model = shutil.copytree(clean_model, directory)
    weights = load_file(model / "model.safetensors")
    edit(weights)
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def set_nan(name):
    def edit(weights):
        weights[name][2, 5] = float("nan")
    return edit


def last_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output and [l for l in lines if l.startswith("error: ")] == [lines[-1]], \
        result.output
    return lines[-1]


def calibrate(model, text, run):
    return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(text), "--samples", "2",
                               "--seqlen", "16", "--device", "cpu", "--run", str(run)])


@pytest.mark.parametrize("name, numel", [(UP, 32 * 64), ("model.embed_tokens.weight", 320 * 64)])
def test_calibrate_refuses_a_nan_weight_naming_tensor_and_file(name, numel, clean_model, calib_text, tmp_path):
    model = edited_copy(clean_model, tmp_path / "model", set_nan(name))
    assert last_line_error(calibrate(model, calib_text, tmp_path / "run")) == (
        f"error: tensor {name} in {model / 'model.safetensors'} holds 1 NaN/inf value(s) of {numel}; the "
        f"checkpoint is damaged: re-download it, or re-save it from finite weights")


def test_weights_damaged_after_calibration_are_refused_not_taken_for_a_float16_overflow(clean_model, calib_text,
                                                                                         tmp_path):
    """The old code went on to klt-svd's "overflows float16 ... use --rank 0". Now the lineage check sees
    that the model's files are no longer those calibrate read, before any weight is used."""
    model = shutil.copytree(clean_model, tmp_path / "model")
    run = tmp_path / "run"
    assert calibrate(model, calib_text, run).exit_code == 0
    edited_copy(clean_model, tmp_path / "damaged", set_nan(UP))
    shutil.copyfile(tmp_path / "damaged" / "model.safetensors", model / "model.safetensors")
    message = last_line_error(runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "2", "--device", "cpu"]))
    assert f"{run} was calibrated on" in message and "whose files differ (model.safetensors)" in message, message
    assert "float16" not in message


def test_overflowing_activations_are_refused_by_the_calibration_reader(clean_model, calib_text, tmp_path):
    def overflow(weights):  # finite weights whose layer-1 expert activations overflow float32 when squared
        for expert in range(8):
            weights[f"model.layers.1.mlp.experts.{expert}.up_proj.weight"] *= 1e25

    run = tmp_path / "run"
    assert calibrate(edited_copy(clean_model, tmp_path / "model", overflow), calib_text, run).exit_code == 0
    message = last_line_error(runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "2", "--device", "cpu"]))
    assert message.startswith("error: the calibration statistics of layer 1 are not finite: NaN/inf in "), message
    assert message.endswith("the model's activations overflow there: check its weights, then rerun "
                            "`kbvq calibrate --restart`")
    assert "experts.down.variance" in message  # the compact layout's per-expert variances


def test_count_non_finite_goes_chunk_by_chunk(monkeypatch):
    from kbvq_cli import finite

    monkeypatch.setattr(finite, "CHUNK", 7)
    values = torch.zeros(100)
    values[[0, 6, 7, 50, 99]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan"), 1.0])
    assert finite.count_non_finite(values) == 4
    assert finite.count_non_finite(torch.arange(10)) == 0
