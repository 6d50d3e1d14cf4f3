"""Every stage resumes from a partial run with bit-identical shards.

calibrate and vq are killed with SIGKILL mid-run elsewhere (test_calibrate_resume, test_method_end_to_end);
here bcos --propagate (layer-streamed, with activation checkpoints) is killed too, and the fast
per-layer stages are rewound to a partial manifest, which is exactly what a kill between two commits leaves.
"""

import json

import pytest

from cli_util import invoke
from resume_util import kill_after_units, run_to_end, shard_hashes
from tiny_models import build_tiny_model



def rewind(stage_dir, keep: int) -> None:
    """Leave the manifest as a kill after `keep` committed units would (later shards become orphans)."""
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    names = sorted(manifest["units"])
    for name in names[keep:]:
        del manifest["units"][name]
    manifest["complete"] = False
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, calib_text):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model("qwen2_moe", root / "model", num_hidden_layers=4, hidden_size=128,
                             moe_intermediate_size=64, shared_expert_intermediate_size=96)
    run = root / "run"
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 16, "--seqlen", 64, "--run", run)
    invoke("klt-svd", "--run", run, "--rank", 2)
    invoke("vq", "--run", run, "--iters", 10)
    return model, run


@pytest.mark.parametrize("stage", ["klt-svd", "bcos"])
def test_rewound_stage_completes_identically(stage, quantized_run):
    _, run = quantized_run
    if stage == "bcos":
        invoke("bcos", "--run", run)
    before = shard_hashes(run / stage)
    rewind(run / stage, keep=1)
    invoke(stage, "--run", run)
    assert shard_hashes(run / stage) == before


@pytest.mark.slow
def test_propagated_bcos_resumes_after_sigkill(quantized_run, tmp_path):
    _, run = quantized_run
    import shutil

    copies = {}
    for name in ("straight", "killed"):
        copies[name] = tmp_path / name
        shutil.copytree(run, copies[name], ignore=shutil.ignore_patterns("bcos"))
    run_to_end(["bcos", "--propagate", "--run", str(copies["straight"])])
    killed = ["bcos", "--propagate", "--run", str(copies["killed"])]
    assert kill_after_units(killed, copies["killed"] / "bcos", units=1) == 1
    manifest = json.loads((copies["killed"] / "bcos" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["units"]) == 1
    run_to_end(["bcos", "--propagate", "--run", str(copies["killed"])])
    assert shard_hashes(copies["killed"] / "bcos") == shard_hashes(copies["straight"] / "bcos")
