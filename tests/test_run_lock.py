"""One writer per run directory: a second kbvq process is refused in one line, a crashed holder's lock is broken.

The holder is a real second process that takes the lock and then waits on its stdin; the test reads its
"held" line before going on, so nothing here races against the clock.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.errors import KbvqError
from kbvq_cli.run_lock import LOCK_NAME, run_lock
from resume_util import paused_after_units

runner = CliRunner()

HOLDER = """
import sys
from pathlib import Path
from kbvq_cli.run_lock import run_lock

with run_lock(Path(sys.argv[1]), "kbvq vq --run " + sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""


class Holder:
    """A second process holding the lock of `run_dir` until `release()` or `kill()`."""

    def __init__(self, run_dir: Path):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline() == "held\n", "the holder did not take the lock"
        self.pid = self.process.pid

    def release(self) -> None:
        self.process.stdin.close()
        assert self.process.wait() == 0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()


def snapshot(directory: Path) -> dict:
    """Every path under `directory` with its bytes and mtime: what "nothing changed on disk" compares."""
    return {str(path.relative_to(directory)): (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*"))}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "model"), "vq": {"bits": 2}}))
    return run


def test_a_second_writer_is_refused_in_one_line_and_changes_nothing(run_dir):
    holder = Holder(run_dir)
    try:
        record = json.loads((run_dir / LOCK_NAME).read_text())
        before = snapshot(run_dir)
        result = runner.invoke(app, ["vq", "--run", str(run_dir), "--bits", "3"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            f"error: {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()} (kbvq vq --run "
            f"{run_dir}) since {record['since']}; wait for it or stop it")
        assert snapshot(run_dir) == before
    finally:
        holder.release()
    assert not (run_dir / LOCK_NAME).exists()
    # Released: the same command now gets past the lock (and stops at the missing calibrate stage).
    result = runner.invoke(app, ["vq", "--run", str(run_dir), "--bits", "3"])
    assert result.exit_code == 2 and "stage calibrate has not been run" in result.output, result.output
    assert not (run_dir / LOCK_NAME).exists() and not (run_dir / "vq").exists()


def test_a_running_kbvq_stage_refuses_a_second_one_naming_its_command(tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    args = ["calibrate", "--model", str(tiny_model_dir("qwen3_moe")), "--data", str(calib_text), "--samples", "2",
            "--seqlen", "16", "--device", "cpu", "--run", str(run)]
    with paused_after_units(args, run / "calibrate", units=1) as (pid, _):  # a real kbvq, mid-stage
        before = snapshot(run)
        since = json.loads((run / LOCK_NAME).read_text())["since"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            f"error: {run} is in use by pid {pid} on host {socket.gethostname()} (kbvq {' '.join(args)}) since "
            f"{since}; wait for it or stop it")
        assert snapshot(run) == before


def test_kbvq_run_is_refused_while_its_shared_calibration_is_held(tmp_path):
    calibration = tmp_path / "calibration"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tmp_path / "model"), "calibration": str(calibration)}))
    holder = Holder(calibration)
    try:
        result = runner.invoke(app, ["run", "--recipe", str(recipe), "--run", str(tmp_path / "variant")])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines()[-1].startswith(
            f"error: {calibration} is in use by pid {holder.pid} on host ")
    finally:
        holder.release()
    assert not (tmp_path / "variant").exists(), "the refused run left its run directory behind"


def test_the_lock_of_a_sigkilled_holder_is_released_and_its_file_broken_with_a_warning(run_dir, capsys):
    holder = Holder(run_dir)
    holder.kill()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid  # the file stays behind
    with run_lock(run_dir, "kbvq test"):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    warning = " ".join(capsys.readouterr().err.split())
    assert f"warning: breaking the stale lock of {run_dir}: pid {holder.pid} on host {socket.gethostname()} " \
           f"(kbvq vq --run {run_dir}) since" in warning and warning.endswith("is gone")
    assert not (run_dir / LOCK_NAME).exists()


def test_a_lock_file_from_another_host_is_not_broken(run_dir):
    lock = run_dir / LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "command": "kbvq vq",
                                "since": "2025-01-01 00:00:00"}))
    with pytest.raises(KbvqError) as refused:
        with run_lock(run_dir, "kbvq test"):
            pass
    assert str(refused.value) == (
        f"{run_dir} is locked by pid 4242 on host elsewhere.example (kbvq vq) since 2025-01-01 00:00:00, and "
        f"kbvq cannot tell from this host whether it still runs; wait for it or stop it, or if it is gone "
        f"delete {lock}")
    assert json.loads(lock.read_text())["host"] == "elsewhere.example"


PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


def lock_state(run_dir: Path) -> str:
    """What another process finds: "held" or "free"."""
    result = subprocess.run([sys.executable, "-c", PROBE, str(run_dir / LOCK_NAME)], capture_output=True,
                            text=True, check=True)
    return result.stdout.strip()


def test_the_lock_is_re_entrant_within_one_process(run_dir):
    with run_lock(run_dir, "kbvq run"):
        with run_lock(run_dir / ".." / run_dir.name, "kbvq vq"):  # the same directory by another path
            assert lock_state(run_dir) == "held"
        assert lock_state(run_dir) == "held", "leaving the inner block must not release the outer hold"
    assert not (run_dir / LOCK_NAME).exists()


def test_a_failed_command_leaves_no_run_directory(tmp_path):
    result = runner.invoke(app, ["klt-svd", "--run", str(tmp_path / "runs" / "new")])
    assert result.exit_code == 2 and "has not been run" in result.output, result.output
    assert not (tmp_path / "runs").exists()
