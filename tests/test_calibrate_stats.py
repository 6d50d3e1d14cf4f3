"""calibrate's statistics equal a direct float64 computation through the unmodified transformers model."""

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import ARCHITECTURES
from kbvq_cli.app import app
from kbvq_cli.stage_dir import StageDir


def run_calibrate(model_dir, run_dir, calib_text, tmp_path, **extra):
    recipe = tmp_path / "recipe.yaml"
    settings = {"data": str(calib_text), "samples": 4, "seqlen": 32, "moments_dtype": "float64", **extra}
    recipe.write_text(yaml.safe_dump({"model": str(model_dir), "calibrate": settings}))
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run_dir), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    return StageDir.open_finished(run_dir, "calibrate")


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


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_statistics_match_float64_reference(model_type, tiny_model_dir, calib_text, tmp_path):
    model_dir = tiny_model_dir(model_type)
    stage = run_calibrate(model_dir, tmp_path / "run", calib_text, tmp_path)
    tokens = stage.read_aux("tokens")["input_ids"]
    assert tokens.shape == (4, 32)
    model, captured = reference_inputs(model_dir, tokens)
    for index, layer in enumerate(model.model.layers):
        shard = stage.read_unit(f"layer_{index:03d}")
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and (index, name) in captured:
                x = torch.cat(captured[(index, name)])
                assert_close(shard[f"linear.{name}.sum_xxT"], x.T @ x)
                assert_close(shard[f"linear.{name}.sum_x"], x.sum(0))
        if (index, "experts") not in captured:
            assert "block.count" not in shard
            continue
        hidden = torch.cat([h for h, _ in captured[(index, "experts")]])
        routing = torch.cat([r for _, r in captured[(index, "experts")]])
        experts = layer.mlp.experts
        num_experts = experts.gate_up_proj.shape[0]
        mask = torch.nn.functional.one_hot(routing, num_experts + 1).sum(1)[:, :num_experts].double()
        assert_close(shard["block.sum_xxT"], hidden.T @ hidden)
        assert shard["block.count"].item() == hidden.shape[0]
        assert torch.equal(shard["router.load"], mask.sum(0).long())
        intermediate = experts.gate_up_proj.shape[1] // 2
        for e in range(num_experts):
            w = experts.gate_up_proj[e]
            h = experts.act_fn(hidden @ w[:intermediate].T) * (hidden @ w[intermediate:].T)
            m = mask[:, e:e + 1]
            assert_close(shard["experts.gate_up.sum_xxT"][e], (hidden * m).T @ hidden)
            assert_close(shard["experts.gate_up.sum_x"][e], (hidden * m).sum(0))
            assert_close(shard["experts.down.sum_xxT"][e], (h * m).T @ h)
            assert_close(shard["experts.down.sum_x"][e], (h * m).sum(0))
        assert_close(shard["experts.down.pooled_sum_xxT"], shard["experts.down.sum_xxT"].double().sum(0))


def test_without_expert_second_moments_keeps_pooled(tiny_model_dir, calib_text, tmp_path):
    full = run_calibrate(tiny_model_dir("qwen2_moe"), tmp_path / "a", calib_text, tmp_path)
    lean = run_calibrate(tiny_model_dir("qwen2_moe"), tmp_path / "b", calib_text, tmp_path,
                         expert_second_moments=False)
    full_shard, lean_shard = full.read_unit("layer_001"), lean.read_unit("layer_001")
    assert "experts.down.sum_xxT" not in lean_shard and "experts.gate_up.sum_xxT" not in lean_shard
    assert_close(lean_shard["experts.down.pooled_sum_xxT"], full_shard["experts.down.pooled_sum_xxT"].double())
