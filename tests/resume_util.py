"""Kill a real `kbvq` subprocess mid-stage with SIGKILL, resume it, and compare with an uninterrupted run.

The kill lands at a chosen commit, not after a chosen time: see `kill_after_units`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

KBVQ = [sys.executable, "-m", "kbvq_cli.app"]
PAUSED = Path(__file__).with_name("pause_after_commit.py")
PATIENCE = 3600.0  # seconds: far beyond any stage of these tests on a loaded machine; only a hang hits it


def shard_hashes(stage_dir: Path) -> dict[str, str]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["complete"]
    return {name: record["sha256"] for name, record in manifest["units"].items()}


def run_to_end(args: list[str], env=None) -> None:
    result = subprocess.run(KBVQ + args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def kill_after_units(args: list[str], stage_dir: Path, units: int, env=None) -> int:
    """Run `kbvq args` until its stage has committed `units` units, SIGKILL it there; returns the units done."""
    with paused_after_units(args, stage_dir, units, env) as (_, done):
        return done


@contextmanager
def paused_after_units(args: list[str], stage_dir: Path, units: int, env=None) -> Iterator[tuple[int, int]]:
    """Run `kbvq args` until its stage has committed `units` units and keep it there, alive, for the block
    (yields its pid and the units done); it is SIGKILLed when the block ends.

    The subprocess pauses itself right after that commit (pause_after_commit.py) and says so on a pipe;
    nothing happens to it before that, so the test does not depend on how fast the machine runs the stage.
    """
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen([sys.executable, str(PAUSED), str(units), str(write_end), *args],
                                   stdout=subprocess.DEVNULL, stderr=stderr, env=env, pass_fds=(write_end,),
                                   start_new_session=True)
        os.close(write_end)  # the child holds the only write end: EOF on the pipe means it has exited
        try:
            message = _read_line(read_end, PATIENCE)
            if not message.startswith("paused "):
                process.wait()
                stderr.seek(0)
                tail = stderr.read().decode(errors="replace")[-3000:]
                raise AssertionError(f"kbvq {' '.join(args)} ended (rc={process.returncode}) before {units} units "
                                     f"of {stage_dir.name} were committed:\n{tail}")
            yield process.pid, int(message.split()[1])
        finally:
            os.close(read_end)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _read_line(fd: int, timeout: float) -> str:
    """One line from a pipe, or what it held at EOF; `timeout` only guards against a hung subprocess."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise AssertionError(f"the subprocess neither paused nor exited in {timeout:.0f} s; it hangs")
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode()
