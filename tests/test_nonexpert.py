"""kbvq nonexpert: the layers outside the experts, kept by default (the paper's accounting) or quantized
by RTN/GPTQ; packed, loaded and exported like the experts."""

import json

import pytest
import torch

from cli_util import invoke
from kbvq_cli.model_files import ModelSource
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit
from stages.nonexpert.stage import chosen_linears



def quantized_run(model_dir, text, run, *nonexpert):
    invoke("calibrate", "--model", model_dir, "--data", text, "--samples", 8, "--seqlen", 64, "--run", run)
    for args in (("klt-svd", "--rank", 2), ("vq", "--iters", 3), ("bcos",), ("nonexpert", *nonexpert), ("pack",)):
        invoke(*args, "--run", run)


def test_linear_choice_skips_router_experts_and_gates(tiny_model_dir):
    source = ModelSource(str(tiny_model_dir("qwen2_moe")))
    paths = chosen_linears(source, source.layer_state_dict(0), ("self_attn", "mlp"))
    assert paths == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    deepseek = ModelSource(str(tiny_model_dir("deepseek_v2")))
    dense = chosen_linears(deepseek, deepseek.layer_state_dict(0), ("mlp",))  # layer 0 is a dense MLP
    assert dense == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def test_default_keeps_them_and_changes_nothing(tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    quantized_run(tiny_model_dir("qwen2_moe"), calib_text, run)
    assert StageDir.open_finished(run, "nonexpert").unit_names() == []
    assert StageDir.open_finished(run, "pack").manifest["summary"]["storage"]["parts"]["nonexpert_quantized"] == 0


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_attention_packs_loads_and_exports(method, tiny_model_dir, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM

    from kbvq_cli import load_quantized
    from kbvq_cli.scalar_quant import dequantize
    from stages.nonexpert.reader import NonExpertCodes

    model_dir, run = tiny_model_dir("qwen2_moe"), tmp_path / "run"
    quantized_run(model_dir, calib_text, run, "--method", method, "--bits", 4, "--group-size", 32)
    ids = torch.tensor([[2, 7, 1, 8, 2, 8, 1, 8]])
    from kbvq_cli.packed.reference_loader import load_reference

    packed = load_quantized(run)
    with torch.no_grad():
        got = packed(input_ids=ids).logits
        expected = load_reference(run)(input_ids=ids).logits  # every linear dequantized whole
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
        invoke("pack", "--run", run, "--dense")
        dense_model = AutoModelForCausalLM.from_pretrained(str(run / "dense"), dtype=torch.float32)
        nonexpert = NonExpertCodes(run)
        for index, layer in enumerate(dense_model.model.layers):
            matrices = nonexpert.layer(index)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the export holds the dequantized attention
                expected = dequantize(matrices[f"self_attn.{name}"])
                assert torch.allclose(getattr(layer.self_attn, name).weight, expected)
        original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert packed.model.layers[0].self_attn.q_proj.bias is not None  # Qwen's q/k/v biases kept
    assert not torch.allclose(got, original(input_ids=ids).logits, atol=1e-3)
    storage = StageDir.open_finished(run, "pack").manifest["summary"]["storage"]
    attention = sum(o * i for o, i in [(64, 64), (32, 64), (32, 64), (64, 64)]) * 2  # 2 layers, kv heads 2 x 16
    expected_bytes = attention * 4 // 8 + sum(o * (i // 32) for o, i in [(64, 64), (32, 64), (32, 64), (64, 64)]) * 2 * 4
    assert storage["parts"]["nonexpert_quantized"] == expected_bytes
    config = json.loads((run / "pack" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "kbvq"
