"""Every stage under torchrun (gloo, CPU): the same shards as one process, also after a killed rank and a
rerun with another world size. The end-to-end tests start real torchrun jobs (marked slow); the
assignment, block partition, ordered sums and journals are checked in-process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kbvq_cli.data_parallel import Blocks, add_round, read_blocks
from kbvq_cli.distributed import assign
from kbvq_cli.experts import SHARED, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.moments import input_moments
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import expert_unit
from resume_util import PATIENCE, shard_hashes
from stages.bcos.parallel import block_rows, ordered_moments
from tiny_models import build_tiny_model

PAUSE = Path(__file__).with_name("pause_rank.py")
STAGES = ("calibrate", "klt-svd", "vq", "bcos", "pack")


def _env() -> dict:
    # one thread everywhere: torchrun sets it for its workers, and results depend on it in the last bits
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def torchrun(ranks: int, *args, script: list[str] | None = None) -> subprocess.Popen:
    """A torchrun job of `ranks` processes on a free port, running `kbvq ARGS` (or `script` ARGS)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    # `--` keeps torchrun from reading kbvq's own options (`--run` would abbreviate its `--run-path`); torchrun
    # drops the first `--` of its command
    program = ["--no-python", "--", sys.executable, *script] if script else ["-m", "kbvq_cli", "--"]
    return subprocess.Popen([*launcher, *program, *map(str, args)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, code: int = 0) -> str:
    output, _ = process.communicate(timeout=PATIENCE)
    assert process.returncode == code, output[-4000:]
    return output


def assert_bars_complete(output: str) -> None:
    """Every progress bar rank 0 drew ended at its total: it counted the units of every rank."""
    bars = re.findall(r"(\d+)/(\d+) \d+:\d\d:\d\d eta", output)
    assert bars and all(done == total for done, total in bars), bars


def single(*args) -> None:
    result = subprocess.run([sys.executable, "-m", "kbvq_cli", *map(str, args)], env=_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def kill_rank_after(ranks: int, rank: int, units: int, marker: Path, *args) -> None:
    """Run `kbvq ARGS` on `ranks` processes until rank `rank` has committed `units` units; SIGKILL it there."""
    process = torchrun(ranks, rank, units, marker, *args, script=[str(PAUSE)])
    deadline = time.monotonic() + PATIENCE  # only a hang reaches it: the pause waits for a commit, not a time
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the job ended before rank {rank} paused:\n{process.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, "the job neither paused nor ended: it hangs"
        time.sleep(0.2)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    process.communicate(timeout=PATIENCE)
    assert process.returncode != 0  # torchrun ends the job when a rank dies


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, calib_text) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    model = build_tiny_model("qwen2_moe", root / "model", num_hidden_layers=3)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(model), "method": "kbvq",
        # min_expert_tokens 60 is about the mean load of 7 x 32 tokens top-2 of 8, so some experts starve and
        # calibrate's fallback pass runs; bcos propagates. Every torchrun job below covers both at no extra launch.
        "calibrate": {"data": str(calib_text), "samples": 7, "seqlen": 32, "batch_size": 2, "min_expert_tokens": 60},
        "klt-svd": {"rank": 2}, "vq": {"bits": 2, "iters": 5}, "bcos": {"propagate": True},
        "eval": {"ppl_data": str(calib_text), "seqlen": 32, "tasks": "none"}}))
    return path


@pytest.fixture(scope="module")
def reference(recipe) -> Path:
    """Every stage of the recipe in one process."""
    run = recipe.parent / "single"
    single("run", "--recipe", recipe, "--run", run)
    return run


def _copy(run: Path, to: Path, *stages: str) -> Path:
    to.mkdir()
    for stage in stages:
        shutil.copytree(run / stage, to / stage)
    shutil.copy(run / "recipe.yaml", to / "recipe.yaml")
    return to


@pytest.mark.slow
def test_kbvq_run_on_two_ranks_writes_the_shards_of_one_process(recipe, reference, tmp_path):
    run = tmp_path / "two"
    output = finish(torchrun(2, "run", "--recipe", recipe, "--run", run))
    # the starved experts' fallback pass and the propagated bcos pass are reduced in block order like the
    # first pass: the same bits on any world size
    assert json.loads((reference / "calibrate" / "manifest.json").read_text())["state"]["starved_tokens"], \
        "the test needs starved experts"
    assert json.loads((reference / "bcos" / "manifest.json").read_text())["config"]["propagate"] is True
    for stage in STAGES:
        assert shard_hashes(run / stage) == shard_hashes(reference / stage), stage
        assert not list((run / stage).glob("journal-rank-*")), stage
    assert output.count("calibrate: 3 layers") == 1, output  # rank 0 alone speaks
    assert_bars_complete(output)
    # eval ran on rank 0 alone (the other rank's path: test_eval_on_a_rank_other_than_zero_...), as one process
    assert json.loads((run / "eval" / "results.json").read_text()) == json.loads(
        (reference / "eval" / "results.json").read_text())


@pytest.mark.slow
def test_gptq_on_two_ranks_matches_one_process(reference, tmp_path):
    runs = {name: _copy(reference, tmp_path / name, "calibrate") for name in ("one", "two")}
    single("gptq", "--run", runs["one"])
    assert_bars_complete(finish(torchrun(2, "gptq", "--run", runs["two"])))
    assert shard_hashes(runs["two"] / "gptq") == shard_hashes(runs["one"] / "gptq")


@pytest.mark.slow
def test_a_rank_killed_mid_vq_resumes_on_another_world_size_with_the_same_bytes(reference, tmp_path):
    run = _copy(reference, tmp_path / "killed", "calibrate", "klt-svd")
    kill_rank_after(2, 1, 3, tmp_path / "paused", "vq", "--run", run)
    journal = json.loads((run / "vq" / "journal-rank-001.json").read_text())
    assert len(journal["units"]) == 3  # what the killed rank had committed
    assert_bars_complete(finish(torchrun(3, "vq", "--run", run)))
    assert shard_hashes(run / "vq") == shard_hashes(reference / "vq")
    assert not list((run / "vq").glob("journal-rank-*"))


@pytest.mark.slow
def test_calibrate_killed_on_two_ranks_resumes_on_three_with_the_same_bytes(recipe, reference, tmp_path):
    run = tmp_path / "calibration"
    args = ("calibrate", "--recipe", recipe, "--run", run)
    kill_rank_after(2, 0, 2, tmp_path / "paused", *args)
    manifest = json.loads((run / "calibrate" / "manifest.json").read_text())
    assert sorted(manifest["aux"]) == ["activations", "activations.rank-001", "tokens"]  # each rank's blocks
    finish(torchrun(3, *args))
    assert shard_hashes(run / "calibrate") == shard_hashes(reference / "calibrate")


@pytest.mark.slow
def test_an_error_on_every_rank_is_one_line_and_changes_nothing(reference, tmp_path):
    run = _copy(reference, tmp_path / "refused", "calibrate", "klt-svd")
    before = sorted(p.name for p in (run).rglob("*"))
    output = finish(torchrun(2, "vq", "--run", run, "--device", "cuda"), code=1)  # torchrun's own status
    assert output.count("error: --device cuda asked for, but no CUDA device is visible") == 1, output
    assert sorted(p.name for p in run.rglob("*")) == before


def test_eval_on_a_rank_other_than_zero_leaves_at_once_and_writes_nothing(tmp_path):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}  # what torchrun gives its rank 1
    result = subprocess.run([sys.executable, "-m", "kbvq_cli", "eval", "--run", str(tmp_path / "run")], env=env,
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not list(tmp_path.iterdir())


def test_assignment_balances_by_cost_and_depends_only_on_names_and_world_size():
    costs = {f"layer_000.expert_{e:03d}": 1.0 for e in range(8)} | {"layer_000.shared": 4.0}
    owner = assign(costs, 3)
    assert owner == assign(dict(reversed(list(costs.items()))), 3)  # the order the units come in is no input
    loads = [sum(cost for name, cost in costs.items() if owner[name] == rank) for rank in range(3)]
    assert sorted(loads) == [4.0, 4.0, 4.0]
    assert owner["layer_000.shared"] == 0  # the largest first, to the first rank


@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_a_128_expert_layer_and_its_larger_shared_expert_spread_evenly_by_weight_count(ranks):
    routed, shared = 3 * 64 * 16, 3 * 64 * 128  # Qwen-like: the shared expert is 8 routed experts' worth
    costs = {expert_unit(5, e): routed for e in range(128)} | {expert_unit(5, SHARED): shared}
    owner = assign(costs, ranks)
    loads = [sum(cost for name, cost in costs.items() if owner[name] == rank) for rank in range(ranks)]
    assert max(loads) - min(loads) <= routed  # within one routed expert of even
    by_count = assign(dict.fromkeys(costs, 1.0), ranks)  # counting units instead leaves the shared expert's rank behind
    count_loads = [sum(cost for name, cost in costs.items() if by_count[name] == rank) for rank in range(ranks)]
    assert max(count_loads) - min(count_loads) > routed


def test_work_estimates_are_the_weight_counts_of_the_checkpoint(tmp_path):
    source = ModelSource(str(build_tiny_model("qwen2_moe", tmp_path / "model", num_hidden_layers=1)))
    experts = layer_experts(source, 0)
    config = source.config
    assert experts.parameters(0) == 3 * config.hidden_size * config.moe_intermediate_size
    assert experts.parameters(SHARED) == 3 * config.hidden_size * config.shared_expert_intermediate_size
    assert sum(source.tensor_sizes.values()) == source.stored_totals()[0]
    assert source.tensor_sizes["model.embed_tokens.weight"] == config.vocab_size * config.hidden_size


def test_blocks_partition_the_sequences_the_same_way_for_any_world_size():
    rows = torch.arange(7)
    for ranks in (1, 2, 3):
        shares = [Blocks(7, 2, rank, ranks) for rank in range(ranks)]
        assert sorted(b for share in shares for b in share.mine()) == [0, 1, 2, 3]
        assert sorted(torch.cat([share.select(rows) for share in shares]).tolist()) == rows.tolist()
        for share in shares:
            for block in share.mine():
                begin, end = share.local_span(block)
                assert share.select(rows)[begin:end].tolist() == rows[slice(*share.span(block))].tolist()


def test_block_sums_are_added_in_block_order_from_zero():
    parts = [torch.randn(5, dtype=torch.float64) * 10 ** e for e in range(-8, 9, 4)]
    total = None
    for round_, part in enumerate(parts):
        total = add_round(total, {"x": part}, Blocks(len(parts), 1), round_)
    expected = torch.zeros(5, dtype=torch.float64)
    for part in parts:
        expected += part
    assert torch.equal(total["x"], expected)


def test_propagated_moments_sum_each_blocks_tokens_in_block_order():
    blocks, per_sequence = Blocks(5, 2), 3  # 5 sequences of 3 tokens in blocks of 2, 2, 1 sequences
    x = torch.randn(15, 4) * torch.tensor([1e-3, 1.0, 1e3, 1e6])
    tokens = torch.tensor([0, 2, 5, 6, 7, 13])  # the tokens routed to one expert
    rows = block_rows(tokens, blocks, per_sequence)
    assert [rows(block).tolist() for block in range(3)] == [[0, 2, 5], [6, 7], [13]]
    assert block_rows(None, blocks, per_sequence)(2).tolist() == [12, 13, 14]  # a shared expert: all
    found = ordered_moments(lambda block: x[rows(block)], 4, blocks, "cpu")
    sum_x, sum_xxT = torch.zeros(4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    for block in range(3):  # the defined order: within a block, then blocks from zero
        part = x[rows(block)]
        sum_x += part.sum(0, dtype=torch.float64)
        sum_xxT += (part.T @ part).double()
    expected = input_moments(sum_x, sum_xxT, 6)
    assert found.count == 6
    assert torch.equal(found.mean, expected.mean) and torch.equal(found.covariance, expected.covariance)
    reference = x[tokens].double()
    torch.testing.assert_close(found.mean, reference.mean(0))
    torch.testing.assert_close(found.covariance, torch.cov(reference.T, correction=0), rtol=1e-5, atol=1e-3)


def test_activations_of_any_world_size_give_each_rank_its_blocks():
    hidden = torch.randn(7, 3, 2)
    two = [Blocks(7, 2, rank, 2) for rank in range(2)]
    files = [{"hidden": share.select(hidden), "blocks": torch.tensor(share.mine())} for share in two]
    for ranks in (1, 3):
        for rank in range(ranks):
            share = Blocks(7, 2, rank, ranks)
            assert torch.equal(read_blocks(files, share), share.select(hidden))
    assert read_blocks(files[:1], Blocks(7, 2, 1, 2)) is None  # rank 1's file lost: recomputed


def test_journals_are_merged_into_the_manifest_on_resume(tmp_path):
    stage = StageDir.open_for_write(tmp_path, "demo", {"a": 1}, {"b": 2})
    stage.write_unit("first", {"x": torch.ones(2)})
    stage.journal_to(1)
    stage.write_unit("second", {"x": torch.zeros(2)})
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["units"].keys() == {"first"}
    (tmp_path / "demo" / "orphan.safetensors").write_bytes(b"never committed")
    resumed = StageDir.open_for_write(tmp_path, "demo", {"a": 1}, {"b": 2})
    assert resumed.unit_names() == ["first", "second"]
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "first.safetensors", "manifest.json", "second.safetensors"]
