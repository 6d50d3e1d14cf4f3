"""Settings outside what the method can do are refused in one line that says what is valid."""

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.expert_shapes import expert_matrix_shapes
from kbvq_cli.model_files import ModelSource
from tiny_models import build_tiny_model

runner = CliRunner()

VALID_VQ = ("valid: bits 2 or 3 with dim 4 (256 or 4096 codewords) and bits 2, 3 or 4 with dim 2 "
            "(16, 64 or 256 codewords), as K = 2^(bits*dim)")


def one_line_error(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "vq settings.iters must be at least 1 (got 0): the codebook is what the Lloyd iterations fit"),
    (["--bits", "4"], f"vq settings.bits=4 is out of range for dim 4; {VALID_VQ}; for 4 bits pass --dim 2"),
    (["--bits", "5", "--dim", "2"], f"vq settings.bits=5 is out of range for dim 2; {VALID_VQ}"),
    (["--dim", "3"], f"vq settings.dim=3 is not supported; {VALID_VQ}"),
])
def test_vq_settings_out_of_range(args, message, tmp_path):
    assert one_line_error("vq", "--run", tmp_path / "run", *args) == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_four_bits_with_dim_two_is_valid():
    from kbvq_cli.settings import parse_settings
    from stages.vq.config import VqSettings

    assert parse_settings(VqSettings, {"bits": 4, "dim": 2}, "vq").bits == 4


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, calib_text):
    """A calibrated run of a tiny Qwen1.5-MoE: routed experts 32 x 64, a shared expert 48 x 64."""
    root = tmp_path_factory.mktemp("rank")
    model = build_tiny_model("qwen2_moe", root / "model")
    run = root / "run"
    result = runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(calib_text), "--samples", "2",
                                 "--seqlen", "16", "--device", "cpu", "--run", str(run)])
    assert result.exit_code == 0, result.output
    return model, run


def test_expert_shapes_come_from_the_headers(calibrated):
    model, _ = calibrated
    assert expert_matrix_shapes(ModelSource(str(model))) == {
        "gate": (32, 64), "up": (32, 64), "down": (64, 32),
        "shared.gate": (48, 64), "shared.up": (48, 64), "shared.down": (64, 48)}


def test_klt_svd_rank_above_min_oc_ic_is_refused_before_anything_is_written(calibrated):
    model, run = calibrated
    recipe = (run / "recipe.yaml").read_bytes()
    assert one_line_error("klt-svd", "--run", run, "--rank", 33, "--device", "cpu") == (
        f"error: klt-svd rank 33 is larger than min(oc, ic) of the expert matrices of {model} (the limit per "
        f"projection: gate 32, up 32, down 32, shared.down 48); pass --rank 32 or less, or a --rank-ratio")
    assert not (run / "klt-svd").exists() and (run / "recipe.yaml").read_bytes() == recipe
    assert runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "32", "--device", "cpu"]).exit_code == 0
