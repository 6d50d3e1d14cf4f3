"""`kbvq calibrate --routing all`: every expert's statistics over every token, the routed output unchanged."""

import torch
from safetensors.torch import load_file

from cli_util import invoke, run_cli


def _calibrate(model, text, run, *flags):
    # The exact layout, so the per-expert sums can be compared with the shared expert's to the bit.
    invoke("calibrate", "--model", model, "--data", text, "--samples", 8, "--seqlen", 32, "--moments", "exact",
           "--run", run, *flags)
    return [load_file(str(run / "calibrate" / f"layer_{i:03d}.safetensors")) for i in range(2)]


def test_all_routing_gives_every_expert_every_token_and_leaves_the_routing_alone(tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen2_moe")
    routed = _calibrate(model, calib_text, tmp_path / "model")
    everything = _calibrate(model, calib_text, tmp_path / "all", "--routing", "all")
    for layer_routed, layer_all in zip(routed, everything):
        tokens = int(layer_all["moments.linear.mlp.shared_expert.gate_proj.count"])
        assert torch.equal(layer_all["experts.gate_up.count"], torch.full((8,), tokens))
        for expert in range(8):  # the block input (read first by the shared expert), expert by expert
            assert torch.equal(layer_all["experts.gate_up.sum_x"][expert], layer_all["moments.linear.mlp.shared_expert.gate_proj.sum_x"])
            torch.testing.assert_close(layer_all["experts.gate_up.sum_xxT"][expert], layer_all["moments.linear.mlp.shared_expert.gate_proj.sum_xxT"])
        # the router's own load, and every statistic outside the routed experts, are the model routing's:
        # the layer computed its routed output, so the next layer saw the same inputs
        assert torch.equal(layer_all["router.load"], layer_routed["router.load"])
        assert torch.equal(layer_routed["router.load"], layer_routed["experts.gate_up.count"])
        for name in layer_routed:
            if name.startswith("moments."):
                assert torch.equal(layer_all[name], layer_routed[name]), name
        assert (layer_all["experts.down.count"] > layer_routed["experts.down.count"]).all()


def test_routing_is_a_checked_setting(tiny_model_dir, calib_text, tmp_path):
    result = run_cli("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--run", tmp_path,
                     "--routing", "some")
    assert result.exit_code == 2 and "routing must be one of model, all" in result.output
    assert not (tmp_path / "calibrate").exists()
