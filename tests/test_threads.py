"""A stage resumes only on the torch thread count it was begun with, unless --allow-thread-change (17.7).

The thread count is set with `torch.set_num_threads` around each in-process command, exactly what
`OMP_NUM_THREADS` sets when a process starts. A partial stage is the manifest a kill between two
commits leaves (as in tests/test_stage_resume.py), so the test does not depend on when a kill lands.
"""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.threads import torch_threads

runner = CliRunner()


def invoke(threads: int, *args):
    with torch_threads(threads):
        return runner.invoke(app, [str(a) for a in args])


def ok(threads: int, *args):
    result = invoke(threads, *args)
    assert result.exit_code == 0, result.output
    return result


def snapshot(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def rewind(stage_dir, keep: int) -> None:
    """Leave the manifest as a kill after `keep` committed units would."""
    path = stage_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in sorted(manifest["units"])[keep:]:
        del manifest["units"][name]
    manifest.update(complete=False, summary={})
    path.write_text(json.dumps(manifest))


@pytest.fixture
def run_on_one_thread(tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    ok(1, "calibrate", "--model", tiny_model_dir("qwen2_moe"), "--run", run, "--data", calib_text, "--samples", 4,
       "--seqlen", 32, "--device", "cpu")
    ok(1, "klt-svd", "--run", run, "--rank", 2)
    ok(1, "vq", "--run", run, "--iters", 2)
    return run


def test_each_manifest_records_the_thread_count_unhashed(run_on_one_thread):
    for stage in ("calibrate", "klt-svd", "vq"):
        manifest = json.loads((run_on_one_thread / stage / "manifest.json").read_text())
        assert manifest["runtime"] == {"threads": 1}
        assert "runtime" not in manifest["config"] and "runtime" not in manifest["inputs"]


def test_partial_work_is_not_resumed_on_another_thread_count(run_on_one_thread):
    run = run_on_one_thread
    rewind(run / "vq", keep=3)
    before = snapshot(run / "vq")
    result = invoke(2, "vq", "--run", run, "--iters", 2)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: vq in {run} was begun with 1 torch thread(s) and this process runs 2; resuming would not match "
        f"an uninterrupted run in the last bits; rerun with OMP_NUM_THREADS=1, or pass --allow-thread-change "
        f"to resume anyway")
    assert snapshot(run / "vq") == before  # refused before any write

    result = ok(2, "vq", "--run", run, "--iters", 2, "--allow-thread-change")
    assert "resumes with 2 (--allow-thread-change)" in " ".join(result.output.split())
    manifest = json.loads((run / "vq" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["runtime"] == {"threads": 2}


def test_the_same_count_resumes_and_a_finished_or_fresh_stage_runs_on_any(run_on_one_thread):
    run = run_on_one_thread
    assert "already complete" in ok(2, "vq", "--run", run, "--iters", 2).output  # nothing left to compute
    rewind(run / "vq", keep=3)
    ok(1, "vq", "--run", run, "--iters", 2)
    ok(2, "bcos", "--run", run)  # a stage of its own: its upstream stages' count does not matter
    assert json.loads((run / "bcos" / "manifest.json").read_text())["runtime"] == {"threads": 2}


def test_a_restart_discards_the_partial_work_and_so_runs_on_any_count(run_on_one_thread):
    run = run_on_one_thread
    rewind(run / "vq", keep=3)
    ok(2, "vq", "--run", run, "--iters", 2, "--restart")
