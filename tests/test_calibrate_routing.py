"""`kbvq calibrate --routing all`: every expert's statistics over every token, the routed output unchanged."""

import json

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


def _threshold_run(model, text, run, minimum, *flags):
    recipe = run.parent / f"{run.name}.yaml"
    recipe.write_text(f"calibrate: {{min_expert_tokens: {minimum}}}\n")
    layers = _calibrate(model, text, run, "--recipe", recipe, *flags)
    return layers, json.loads((run / "calibrate" / "manifest.json").read_text())


def test_a_starved_expert_gets_the_all_token_statistics_and_is_listed(tiny_model_dir, calib_text, tmp_path):
    """Under the model's routing an expert below min_expert_tokens gets, by default, exactly the statistics
    `--routing all` gives it; every other expert keeps its routed ones; the manifest names it with its count."""
    model = tiny_model_dir("qwen2_moe")
    routed = _calibrate(model, calib_text, tmp_path / "model")
    everything = _calibrate(model, calib_text, tmp_path / "all", "--routing", "all")
    minimum = int(routed[0]["router.load"].min()) + 1  # starves layer 0's least-loaded expert(s), not all
    fallback, manifest = _threshold_run(model, calib_text, tmp_path / "fallback", minimum)
    kept, kept_manifest = _threshold_run(model, calib_text, tmp_path / "none", minimum, "--starved-fallback", "none")
    for index in range(2):
        load = routed[index]["router.load"]
        starved = [e for e in range(8) if load[e] < minimum]
        others = [e for e in range(8) if e not in starved]
        assert others and (starved or index == 1)
        for name in fallback[index]:
            if not name.startswith("experts.") or name == "experts.down.pooled_sum_xxT":
                assert torch.equal(fallback[index][name], routed[index][name]), name  # load, pooled: routed
                continue
            assert torch.equal(fallback[index][name][starved], everything[index][name][starved]), name
            assert torch.equal(kept[index][name][starved], routed[index][name][starved]), name
            assert torch.equal(fallback[index][name][others], routed[index][name][others]), name
        for expert in starved:
            assert fallback[index]["experts.down.sum_xxT"][expert].abs().sum() > 0
            assert int(fallback[index]["experts.gate_up.count"][expert]) > int(load[expert])
        for record in (manifest, kept_manifest):
            tokens = {str(e): int(load[e]) for e in starved}
            assert record["state"]["starved_tokens"].get(str(index), {}) == tokens
            assert record["summary"]["starved_tokens"].get(str(index), {}) == tokens
    assert manifest["summary"]["starved_fallback"] == "all-tokens"
    assert kept_manifest["summary"]["starved_fallback"] == "none"
