"""Rerunning `kbvq calibrate` repairs a damaged calibration, without `--restart` (issue 17.3).

Each kind of file of a calibration is damaged in a copy of an uninterrupted run, and the same command
is run again: the result must be that run's bytes. An unfinished calibration is the manifest a kill
after layer k's commit leaves (what `tests/test_calibrate_resume.py` gets from a real SIGKILL), written
directly so that the test does not depend on when a kill lands.
"""

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app
from tiny_models import build_tiny_model

runner = CliRunner()
LAYERS = 4


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def calibrate_args(model, run, calib_text):
    return ["calibrate", "--model", model, "--run", run, "--data", calib_text, "--samples", 8, "--seqlen", 32,
            "--batch-size", 4, "--device", "cpu"]


def committed(stage_dir) -> dict:
    """What identifies a calibration: the committed files and hashes its manifest lists, the state, and
    the bytes of every file on disk (the manifest, which holds timings, aside)."""
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage_dir.iterdir())
             if p.name != "manifest.json"}
    return {"complete": manifest["complete"], "units": manifest["units"], "aux": manifest["aux"],
            "starved": manifest["state"].get("starved"), "files": files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, calib_text):
    root = tmp_path_factory.mktemp("repair")
    model = build_tiny_model("qwen2_moe", root / "model", num_hidden_layers=LAYERS)
    run = root / "straight"
    result = invoke(*calibrate_args(model, run, calib_text))
    assert result.exit_code == 0, result.output
    return model, run


def damaged_copy(straight, tmp_path):
    _, run = straight
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def rerun(straight, copy, calib_text):
    model, _ = straight
    result = invoke(*calibrate_args(model, copy, calib_text))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("layer", [0, 2, LAYERS - 1])
@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_layer_shard_is_redone_from_the_tokens(layer, damage, straight, calib_text, tmp_path):
    copy = damaged_copy(straight, tmp_path)
    shard = copy / "calibrate" / f"layer_{layer:03d}.safetensors"
    flip_a_byte(shard) if damage == "corrupt" else shard.unlink()

    downstream = invoke("klt-svd", "--run", copy, "--rank", 2)
    assert downstream.exit_code == 2
    assert f"rerun `kbvq calibrate --run {copy}` to redo it" in downstream.output

    output = rerun(straight, copy, calib_text)
    if layer:
        assert f"layers 0-{layer - 1} ({layer} layer(s)) run again, forward only" in " ".join(output.split())
    assert committed(copy / "calibrate") == committed(straight[1] / "calibrate")
    assert invoke("klt-svd", "--run", copy, "--rank", 2).exit_code == 0


def test_damaged_tokens_are_rewritten(straight, calib_text, tmp_path):
    copy = damaged_copy(straight, tmp_path)
    flip_a_byte(copy / "calibrate" / "tokens.safetensors")
    rerun(straight, copy, calib_text)
    assert committed(copy / "calibrate") == committed(straight[1] / "calibrate")


def unfinish(stage_dir, next_layer: int, activations: bytes | None) -> None:
    """Leave the manifest a kill right after layer `next_layer - 1`'s commit leaves, with an activations
    checkpoint on disk whose bytes (`activations`, None: no file) are not those the manifest records."""
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    for index in range(next_layer, LAYERS):
        (stage_dir / manifest["units"].pop(f"layer_{index:03d}")["file"]).unlink()
    name = f"activations_{next_layer:03d}.safetensors"
    manifest["aux"]["activations"] = {"file": name, "sha256": "0" * 64, "bytes": len(activations or b"")}
    if activations is not None:
        (stage_dir / name).write_bytes(activations)
    manifest["state"]["next_layer"] = next_layer
    manifest.update(complete=False, summary={})
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("activations", [b"\0" * 64, None], ids=["corrupt", "missing"])
def test_an_unfinished_calibration_with_a_damaged_checkpoint_recomputes_it(activations, straight, calib_text,
                                                                           tmp_path):
    copy = damaged_copy(straight, tmp_path)
    unfinish(copy / "calibrate", 2, activations)
    output = rerun(straight, copy, calib_text)
    assert "layers 0-1 (2 layer(s)) run again, forward only" in " ".join(output.split())
    assert committed(copy / "calibrate") == committed(straight[1] / "calibrate")


def test_all_shards_committed_but_not_marked_complete_just_finishes(straight, calib_text, tmp_path):
    copy = damaged_copy(straight, tmp_path)
    manifest_path = copy / "calibrate" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(complete=False, summary={})  # a kill between the last shard's commit and the final one
    manifest_path.write_text(json.dumps(manifest))
    rerun(straight, copy, calib_text)
    assert committed(copy / "calibrate") == committed(straight[1] / "calibrate")


def test_a_damaged_manifest_is_one_clear_line(straight, calib_text, tmp_path):
    copy = damaged_copy(straight, tmp_path)
    (copy / "calibrate" / "manifest.json").write_text('{"stage": "calibrate", "units": {')
    expected = (f"error: the manifest of calibrate in {copy} is unreadable (not valid JSON); none of its shards "
                f"can be trusted without it; redo the stage with `kbvq calibrate --run {copy} --restart`")
    for args in (calibrate_args(straight[0], copy, calib_text), ["klt-svd", "--run", copy]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1] == expected
