"""A SIGKILLed `kbvq calibrate` resumes at the layer where it stopped, with bit-identical shards."""

import json

import pytest

from resume_util import kill_after_units, run_to_end, shard_hashes
from tiny_models import build_tiny_model


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_shards(tmp_path, calib_text):
    model = build_tiny_model("qwen2_moe", tmp_path / "model", num_hidden_layers=6, hidden_size=96)
    common = ["calibrate", "--model", str(model), "--data", str(calib_text), "--samples", "24",
              "--seqlen", "64", "--device", "cpu"]
    run_to_end(common + ["--run", str(tmp_path / "straight")])

    interrupted = tmp_path / "interrupted"
    done = kill_after_units(common + ["--run", str(interrupted)], interrupted / "calibrate", units=2)
    manifest = json.loads((interrupted / "calibrate" / "manifest.json").read_text())
    assert done == 2 and sorted(manifest["units"]) == ["layer_000", "layer_001"]
    assert not manifest["complete"] and manifest["state"]["next_layer"] == done
    assert "activations" in manifest["aux"]

    run_to_end(common + ["--run", str(interrupted)])
    assert shard_hashes(interrupted / "calibrate") == shard_hashes(tmp_path / "straight" / "calibrate")
    leftovers = sorted(p.name for p in (interrupted / "calibrate").iterdir())
    assert not [name for name in leftovers if name.startswith(("activations", "."))], leftovers
