"""calibrate's statistics equal a direct float64 computation through the unmodified transformers model."""

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ARCHITECTURES
from kbvq_cli.app import app
from stages.calibrate.reader import Calibration


def run_calibrate(model_dir, run_dir, calib_text, tmp_path, **extra):
    recipe = tmp_path / "recipe.yaml"
    settings = {"data": str(calib_text), "samples": 4, "seqlen": 32, "moments_dtype": "float64", **extra}
    recipe.write_text(yaml.safe_dump({"model": str(model_dir), "calibrate": settings}))
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run_dir), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    return Calibration(run_dir)


def reference_inputs(model_dir, tokens):
    """Run the float64 model; capture each layer's experts input/routing and every linear's input."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64, experts_implementation="eager")
    captured, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            def hook(module, args, index=index):
                captured.setdefault((index, "experts"), []).append((args[0].clone(), args[1].clone()))
            handles.append(experts.register_forward_pre_hook(hook))
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                def lin_hook(module, args, key=(index, name)):
                    captured.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
                handles.append(module.register_forward_pre_hook(lin_hook))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return model, captured


def assert_close(actual, expected):
    scale = expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5 * scale)


def assert_close_16bit(actual, expected):
    """The compact layout's per-expert second moments: 16-bit correlations, 11 bits of sqrt(S_ii S_jj)."""
    scale = expected.diagonal().abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-3 * scale)


@pytest.mark.parametrize("layout", ["exact", "compact"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_statistics_match_float64_reference(model_type, layout, tiny_model_dir, calib_text, tmp_path):
    model_dir = tiny_model_dir(model_type)
    # the routed statistics themselves: experts this tiny calibration starves keep them (the fallback that
    # would replace them is tests/test_calibrate_routing.py's)
    stage = run_calibrate(model_dir, tmp_path / "run", calib_text, tmp_path, moments=layout, starved_fallback="none")
    close_per_expert = assert_close if layout == "exact" else assert_close_16bit
    tokens = stage.tokens()
    assert tokens.shape == (4, 32)
    model, captured = reference_inputs(model_dir, tokens)
    for index, layer in enumerate(model.model.layers):
        stats = stage.layer(index)
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and (index, name) in captured:
                x = torch.cat(captured[(index, name)])
                moments = stats.input_moments(f"linear.{name}")
                assert_close(moments.sum_xxT, x.T @ x)
                assert_close(moments.sum_x, x.sum(0))
                assert moments.count.item() == x.shape[0]
        if (index, "experts") not in captured:
            assert not stats.is_moe
            continue
        hidden = torch.cat([h for h, _ in captured[(index, "experts")]])
        routing = torch.cat([r for _, r in captured[(index, "experts")]])
        experts = layer.mlp.experts
        num_experts = experts.gate_up_proj.shape[0]
        mask = torch.nn.functional.one_hot(routing, num_experts + 1).sum(1)[:, :num_experts].double()
        block = stats.input_moments("block")
        assert_close(block.sum_xxT, hidden.T @ hidden)
        assert block.count.item() == hidden.shape[0]
        assert torch.equal(stats.router_load, mask.sum(0).long())
        gate_up, down = stats.expert_moments("gate_up"), stats.expert_moments("down")
        intermediate = experts.gate_up_proj.shape[1] // 2
        pooled_reference = 0
        for e in range(num_experts):
            w = experts.gate_up_proj[e]
            h = experts.act_fn(hidden @ w[:intermediate].T) * (hidden @ w[intermediate:].T)
            m = mask[:, e:e + 1]
            close_per_expert(gate_up.sum_xxT[e], (hidden * m).T @ hidden)
            assert_close(gate_up.sum_x[e], (hidden * m).sum(0))
            close_per_expert(down.sum_xxT[e], (h * m).T @ h)
            pooled_reference = pooled_reference + (h * m).T @ h
            assert_close(down.sum_x[e], (h * m).sum(0))
        pooled = stats.pooled_down_second_moment()
        assert_close(pooled, pooled_reference / (int(down.count.sum()) - 1))


def test_shared_inputs_are_stored_once(tiny_model_dir, calib_text, tmp_path):
    stats = run_calibrate(tiny_model_dir("qwen2_moe"), tmp_path / "run", calib_text, tmp_path).layer(1)
    assert stats.inputs["linear.self_attn.k_proj"] == stats.inputs["linear.self_attn.q_proj"]
    assert stats.inputs["linear.mlp.shared_expert.up_proj"] == stats.inputs["block"]
    assert stats.inputs["linear.mlp.shared_expert.down_proj"] == "linear.mlp.shared_expert.down_proj"
    assert stats.inputs["linear.self_attn.o_proj"] != stats.inputs["linear.self_attn.q_proj"]


def test_without_expert_second_moments_keeps_pooled(tiny_model_dir, calib_text, tmp_path):
    full = run_calibrate(tiny_model_dir("qwen2_moe"), tmp_path / "a", calib_text, tmp_path)
    lean = run_calibrate(tiny_model_dir("qwen2_moe"), tmp_path / "b", calib_text, tmp_path,
                         expert_second_moments=False)
    full_layer, lean_layer = full.layer(1), lean.layer(1)
    assert lean_layer.expert_moments("down").sum_xxT is None and lean_layer.expert_moments("gate_up").sum_xxT is None
    assert_close(lean_layer.pooled_down_second_moment(), full_layer.pooled_down_second_moment())
