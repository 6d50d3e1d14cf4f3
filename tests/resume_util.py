"""Kill a real `kbvq` subprocess mid-stage with SIGKILL, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KBVQ = [sys.executable, "-m", "kbvq_cli.app"]


def shard_hashes(stage_dir: Path) -> dict[str, str]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["complete"]
    return {name: record["sha256"] for name, record in manifest["units"].items()}


def run_to_end(args: list[str], env=None) -> None:
    result = subprocess.run(KBVQ + args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def kill_after_units(args: list[str], stage_dir: Path, units: int, timeout: float = 120, env=None) -> int:
    """Start `kbvq args`, SIGKILL it once `units` units are committed; returns the units done then."""
    process = subprocess.Popen(KBVQ + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    manifest, deadline = stage_dir / "manifest.json", time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            try:
                done = len(json.loads(manifest.read_text())["units"])
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= units:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return done
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    raise AssertionError(f"the run ended (rc={process.returncode}) before {units} units were committed")
