"""Run-directory protocol: atomic shards, manifest as commit point, refusals, corruption detection."""

import json

import pytest
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.stage_dir import StageDir


def make(tmp_path, config=None, inputs=None, restart=False):
    return StageDir.open_for_write(tmp_path, "demo", config or {"a": 1}, inputs or {"m": "x"}, restart=restart)


def test_units_are_committed_with_hashes_and_read_back(tmp_path):
    stage = make(tmp_path)
    stage.write_unit("layer_000", {"w": torch.arange(6.0)}, {"layer": 0})
    manifest = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert manifest["units"]["layer_000"]["sha256"]
    assert torch.equal(stage.read_unit("layer_000")["w"], torch.arange(6.0))
    assert stage.read_metadata("layer_000") == {"layer": 0}


def test_reopen_with_changed_config_is_refused_naming_the_change(tmp_path):
    make(tmp_path, config={"bits": 2})
    with pytest.raises(KbvqError, match=r"\(bits: 2 -> 3\).*--restart"):
        make(tmp_path, config={"bits": 3})
    with pytest.raises(KbvqError, match=r"\(m: x -> y\)"):
        make(tmp_path, config={"bits": 2}, inputs={"m": "y"})
    stage = make(tmp_path, config={"bits": 3}, restart=True)
    assert stage.manifest["config"] == {"bits": 3}


def test_resume_keeps_good_units_and_drops_corrupt_ones(tmp_path):
    stage = make(tmp_path)
    stage.write_unit("u0", {"w": torch.ones(4)})
    stage.write_unit("u1", {"w": torch.zeros(4)})
    shard = tmp_path / "demo" / "u1.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    reopened = make(tmp_path)
    assert reopened.unit_names() == ["u0"]


def test_corrupt_shard_is_never_read(tmp_path):
    stage = make(tmp_path)
    stage.write_unit("u0", {"w": torch.ones(4)})
    stage.finish({})
    shard = tmp_path / "demo" / "u0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(KbvqError, match="corrupt"):
        StageDir.open_finished(tmp_path, "demo").read_unit("u0")


def test_truncated_shard_is_refused_upfront(tmp_path):
    stage = make(tmp_path)
    stage.write_unit("u0", {"w": torch.ones(64)})
    stage.finish({})
    shard = tmp_path / "demo" / "u0.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(KbvqError, match="missing or truncated"):
        StageDir.open_finished(tmp_path, "demo")


def test_upstream_missing_or_unfinished_is_refused(tmp_path):
    with pytest.raises(KbvqError, match="has not been run"):
        StageDir.open_finished(tmp_path, "demo")
    make(tmp_path).write_unit("u0", {"w": torch.ones(2)})
    with pytest.raises(KbvqError, match="unfinished"):
        StageDir.open_finished(tmp_path, "demo")


def test_stale_temp_files_are_cleaned_and_never_listed(tmp_path):
    stage = make(tmp_path)
    (tmp_path / "demo" / ".u9.safetensors.tmp-abc").write_bytes(b"half a shard")
    stage = make(tmp_path)
    assert not list((tmp_path / "demo").glob(".*tmp*"))
    assert stage.unit_names() == []


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    make(tmp_path)
    (tmp_path / "demo" / "manifest.json").write_text("{not json")
    with pytest.raises(KbvqError, match="manifest of .* is unreadable"):
        make(tmp_path)


def test_uncommitted_shards_are_removed_on_resume(tmp_path):
    stage = make(tmp_path)
    stage.write_unit("u0", {"w": torch.ones(2)})
    stage.write_aux("activations_005", {"h": torch.ones(2)})  # written, never committed (killed)
    make(tmp_path)
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.safetensors")) == ["u0.safetensors"]


def test_a_setting_added_later_at_its_default_keeps_old_runs_valid(tiny_model_dir, calib_text, tmp_path):
    """A run whose vq manifest predates a setting (here error_feedback and damp) resumes while the new
    setting keeps its default, and is refused, naming it, when it does not."""
    import json

    from typer.testing import CliRunner

    from kbvq_cli.app import app

    run = tmp_path / "run"
    runner = CliRunner()
    for args in (("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 8,
                  "--seqlen", 64), ("klt-svd", "--rank", 2), ("vq", "--iters", 3)):
        assert runner.invoke(app, [str(a) for a in (*args, "--run", run)]).exit_code == 0
    manifest_path = run / "vq" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("error_feedback", "damp"):
        del manifest["config"][key]
    from kbvq_cli.hashing import hash_json

    manifest["config_hash"] = hash_json(manifest["config"])
    manifest_path.write_text(json.dumps(manifest))
    result = runner.invoke(app, ["vq", "--run", str(run), "--iters", "3"])
    assert result.exit_code == 0 and "already complete" in result.output
    result = runner.invoke(app, ["vq", "--run", str(run), "--iters", "3", "--error-feedback"])
    assert result.exit_code == 2 and "error_feedback" in result.output
