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
