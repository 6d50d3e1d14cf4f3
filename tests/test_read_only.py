"""A finished run on a read-only disk: every stage verifies and skips it, eval reuses its results, and
report writes elsewhere, without writing anything into the run (issue 17.3).

The run is made read-only by a bind mount remounted read-only inside a private mount namespace
(`unshare`), so only the child process sees it read-only and nothing is left mounted if a test dies.
Root ignores file modes, so `chmod` would prove nothing; a read-only mount refuses every write, even
one the code did not mean to make.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app

# Run inside the namespace: mount the run read-only, then every command, in one process (one start-up).
CHILD = r"""
import json, subprocess, sys
run, commands = sys.argv[1], json.loads(sys.argv[2])
subprocess.run(["mount", "--bind", run, run], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", run, run], check=True)
try:
    open(run + "/probe", "w")
    sys.exit("the run is still writable")
except OSError:
    pass
from typer.testing import CliRunner
from kbvq_cli.app import app
results = []
for args in commands:
    result = CliRunner().invoke(app, args)
    results.append({"args": args, "code": result.exit_code, "output": result.output[-1500:],
                    "exception": repr(result.exception) if result.exit_code not in (0, 2) else None})
print("RESULTS" + json.dumps(results))
"""


def namespace_prefix() -> list[str]:
    """`unshare` with a private mount namespace (as root, else in a user namespace), or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare for a read-only bind mount")
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run(prefix + ["sh", "-c", "mount --bind /tmp /tmp"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("this machine permits no private mount namespace (needed for a read-only bind mount)")


def tree(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, calib_text):
    root = tmp_path_factory.mktemp("read-only")
    run, runner = root / "run", CliRunner()
    for args in (("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 4,
                  "--seqlen", 32, "--device", "cpu"),
                 ("klt-svd", "--rank", 2), ("vq", "--iters", 2), ("bcos",), ("nonexpert",), ("pack",),
                 ("eval", "--ppl-data", calib_text, "--seqlen", 32, "--max-tokens", 200, "--tasks", "none")):
        result = runner.invoke(app, [str(a) for a in (*args, "--run", run)])
        assert result.exit_code == 0, result.output
    return root, run


def run_read_only(run: Path, commands: list[list[str]]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.run(namespace_prefix() + [sys.executable, "-c", CHILD, str(run), json.dumps(commands)],
                             capture_output=True, text=True, env=env, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.split("RESULTS", 1)[1])


def test_a_finished_read_only_run_is_verified_skipped_evaluated_and_reported(finished_run):
    root, run = finished_run
    before = tree(run)
    stages = ["calibrate", "klt-svd", "vq", "bcos", "nonexpert", "pack"]
    commands = [[stage, "--run", str(run)] for stage in stages]
    commands += [["eval", "--run", str(run)], ["report", "--run", str(run), "--out", str(root / "report")]]
    results = run_read_only(run, commands)
    for result in results:
        assert result["code"] == 0, result
    for stage, result in zip(stages[:-1], results):
        assert f"{stage}: already complete" in result["output"], result
    assert "packed model" in results[len(stages) - 1]["output"]  # pack shows its storage table instead
    assert "reusing the results" in results[len(stages)]["output"]
    assert (root / "report" / "report.md").exists()
    assert tree(run) == before  # nothing written, renamed or touched


def test_a_refusal_on_a_read_only_run_is_still_one_line(finished_run):
    _, run = finished_run
    [result] = run_read_only(run, [["vq", "--run", str(run), "--bits", "3"]])
    assert result["code"] == 2 and result["output"].strip().splitlines()[-1].startswith(
        f"error: vq in {run / 'vq'} was made with other settings (bits: 2 -> 3"), result
