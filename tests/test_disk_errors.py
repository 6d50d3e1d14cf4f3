"""A full disk or a read-only one gives one line saying what to do, and loses no finished shard.

The real cases run on a small tmpfs and a read-only bind mount, which need root and mount(8); where
mounting is refused they are skipped, and the injected-error tests below still check the translation.
"""

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.atomic import atomic_write
from kbvq_cli.disk_errors import mount_of
from kbvq_cli.errors import KbvqError

runner = CliRunner()


def mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {result.stderr.strip()}")


@pytest.fixture
def mounts():
    """mount(*args) for the test; everything mounted is unmounted afterwards, last first."""
    points = []

    def do(*args: str) -> None:
        mount(*args)
        points.append(args[-1])

    yield do
    for point in reversed(points):
        subprocess.run(["umount", point], check=False)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], result.output
    return lines[-1]


def calibrate(model, text, run):
    return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(text), "--samples", "2",
                               "--seqlen", "16", "--device", "cpu", "--run", str(run)])


def shard_hashes(stage_dir: Path) -> dict:
    return {name: unit["sha256"] for name, unit in json.loads((stage_dir / "manifest.json").read_text())["units"].items()}


def test_a_full_disk_mid_stage_is_one_line_and_the_rerun_completes(mounts, tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen3_moe")
    reference = tmp_path / "reference"
    assert calibrate(model, calib_text, reference).exit_code == 0
    shard = (reference / "calibrate" / "layer_000.safetensors").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk))
    # Leave room for the run's small files (lock, recipe, manifest, tokens) but not for the first layer.
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(bytes(free - shard // 2))
    run = disk / "run"

    message = one_line_error(calibrate(model, calib_text, run))
    match = re.fullmatch(rf"error: no space left on {re.escape(str(disk))} \(tmpfs\) while writing "
                         rf"calibrate/layer_000; free ([\d.]+) KB and rerun \(finished shards are kept\)", message)
    assert match, message
    assert 0.9 * shard <= 1000 * float(match.group(1)) <= 1.1 * shard + 100  # the shard's size, rounded up
    manifest = json.loads((run / "calibrate" / "manifest.json").read_text())
    assert not manifest["complete"] and "tokens" in manifest["aux"]  # what was committed is intact
    assert not [p.name for p in (run / "calibrate").iterdir() if ".tmp-" in p.name], "a temp file was left"

    (disk / "filler").unlink()
    result = calibrate(model, calib_text, run)
    assert result.exit_code == 0, result.output
    assert shard_hashes(run / "calibrate") == shard_hashes(reference / "calibrate")


def test_a_read_only_stage_directory_is_one_line(mounts, tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    assert calibrate(tiny_model_dir("qwen3_moe"), calib_text, run).exit_code == 0
    stage = run / "klt-svd"
    stage.mkdir()
    mounts("--bind", str(stage), str(stage))
    mounts("-o", "remount,ro,bind", str(stage))
    message = one_line_error(runner.invoke(app, ["klt-svd", "--run", str(run), "--rank", "2", "--device", "cpu"]))
    assert message == (f"error: cannot write {stage / 'manifest.json'}: read-only file system; remount it "
                       f"read-write or pass a --run directory on a writable disk (finished shards are kept)")
    assert not (run / ".kbvq.lock").exists()


def test_a_read_only_run_directory_is_one_line_and_unchanged(mounts, tmp_path, tiny_model_dir, calib_text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("model: some/model\n")
    mounts("--bind", str(run), str(run))
    mounts("-o", "remount,ro,bind", str(run))
    # Nothing to write yet: the read-only run is no obstacle to saying what is missing.
    message = one_line_error(runner.invoke(app, ["vq", "--run", str(run)]))
    assert message.startswith("error: stage ") and f"has not been run in {run}" in message, message
    # A command that must write says the disk is read-only, in one line.
    message = one_line_error(runner.invoke(app, ["calibrate", "--model", str(tiny_model_dir("olmoe")), "--data",
                                                 str(calib_text), "--samples", "4", "--seqlen", "32",
                                                 "--run", str(run)]))
    assert "read-only file system; remount it read-write or pass a --run directory on a writable disk" in message
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml"]


# --- the translation itself, with the error raised by the writer function (no mount needed) -------------

def failing_writer(number: int):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(number, os.strerror(number))
    return write


def test_an_injected_enospc_names_the_unit_the_device_and_the_size(tmp_path):
    target = tmp_path / "vq" / "layer_003.expert_007.safetensors"
    with pytest.raises(KbvqError) as error:
        atomic_write(target, failing_writer(errno.ENOSPC), size_hint=2_345_678_901)
    assert str(error.value) == (f"no space left on {mount_of(tmp_path)} while writing vq/layer_003.expert_007; "
                                f"free 2.4 GB and rerun (finished shards are kept)")
    assert list((tmp_path / "vq").iterdir()) == [], "the temp file must be removed, freeing its space"


@pytest.mark.parametrize("number, reason", [(errno.EROFS, "read-only file system"),
                                            (errno.EACCES, "permission denied")])
def test_an_injected_unwritable_error_names_the_file(number, reason, tmp_path):
    target = tmp_path / "bcos" / "manifest.json"
    with pytest.raises(KbvqError, match=re.escape(f"cannot write {target}: {reason}; ")):
        atomic_write(target, failing_writer(number))


def test_other_errors_are_not_translated(tmp_path):
    with pytest.raises(OSError) as error:
        atomic_write(tmp_path / "x.json", failing_writer(errno.EIO))
    assert error.value.errno == errno.EIO
