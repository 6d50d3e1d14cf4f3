"""`kbvq bcos --propagate`: corrections from the quantized model's own stream."""

import torch

from cli_util import invoke
from kbvq_cli.stage_dir import StageDir



def test_propagated_corrections_follow_the_quantized_stream(tiny_model_dir, calib_text, tmp_path):
    runs = {}
    for name, extra in (("closed", []), ("propagated", ["--propagate"])):
        run = tmp_path / name
        invoke("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 8,
               "--seqlen", 32, "--run", run)
        invoke("klt-svd", "--run", run, "--rank", 2)
        invoke("vq", "--run", run, "--iters", 10)
        invoke("bcos", "--run", run, *extra)
        runs[name] = StageDir.open_finished(run, "bcos")
    closed0, prop0 = runs["closed"].read_unit("layer_000"), runs["propagated"].read_unit("layer_000")
    # Layer 0 sees full-precision inputs either way (nothing upstream is quantized): gate/up agree.
    for key in ("gate.scale", "gate.shift", "up.scale", "shared.up.scale"):
        torch.testing.assert_close(prop0[key].float(), closed0[key].float(), rtol=2e-3, atol=2e-3)
    # down sees the corrected gate/up outputs, and layer 1 the quantized stream: they differ.
    assert not torch.allclose(prop0["down.scale"].float(), closed0["down.scale"].float(), atol=1e-3)
    closed1, prop1 = runs["closed"].read_unit("layer_001"), runs["propagated"].read_unit("layer_001")
    assert not torch.allclose(prop1["gate.scale"].float(), closed1["gate.scale"].float(), atol=1e-3)
    assert all(torch.isfinite(t.float()).all() for t in prop1.values())
    leftovers = [p.name for p in (tmp_path / "propagated" / "bcos").iterdir() if p.name.startswith("activations")]
    assert leftovers == []


def test_a_damaged_propagated_layer_is_redone_through_the_recorded_corrections(tiny_model_dir, calib_text, tmp_path):
    """Rerunning repairs a finished `--propagate` run: layer 1's input is recomputed through layer 0 with
    layer 0's recorded corrections installed, so the redone shard has an uninterrupted run's bytes."""
    import json

    run = tmp_path / "run"
    invoke("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 8,
           "--seqlen", 32, "--run", run)
    invoke("klt-svd", "--run", run, "--rank", 2)
    invoke("vq", "--run", run, "--iters", 3)
    invoke("bcos", "--run", run, "--propagate")
    manifest = run / "bcos" / "manifest.json"
    before = json.loads(manifest.read_text())["units"]
    shard = run / "bcos" / "layer_001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    output = invoke("bcos", "--run", run, "--propagate").output
    assert "layers 0-0 (1 layer(s)) run again" in " ".join(output.split())
    after = json.loads(manifest.read_text())
    assert after["complete"] and after["units"] == before
    assert [p.name for p in (run / "bcos").iterdir() if p.name.startswith("activations")] == []
