"""pack -> load_quantized: the packed model computes what the fake-quantized model computes, and its
bytes are what docs/method.md §5 says they should be."""

import json

import pytest
import torch

from cli_util import invoke
from kbvq_cli.model_files import ModelSource
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit
from tiny_models import CONFIGS



def quantize(model, text, run, bits=2, dim=4, rank=2, mode="full", down="pooled"):
    invoke("calibrate", "--model", model, "--data", text, "--samples", 8, "--seqlen", 64, "--run", run)
    invoke("klt-svd", "--run", run, "--rank", rank, "--down", down)
    invoke("vq", "--run", run, "--bits", bits, "--dim", dim, "--iters", 4)
    invoke("bcos", "--run", run, "--mode", mode)
    return invoke("pack", "--run", run)


def fake_quantized_model(model_dir, run, bcos=None):
    """The original model with each MoE layer's experts replaced by `What` with BCOS folded (float32)."""
    from transformers import AutoModelForCausalLM

    from kbvq_cli.experts import layer_experts
    from stages.bcos.propagate import install_corrections
    from stages.bcos.reader import BcosCorrections
    from stages.klt_svd.reader import KltSvd
    from stages.vq.reader import VqCodes

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, experts_implementation="eager")
    source, klt, codes = ModelSource(str(model_dir)), KltSvd(run), VqCodes(run)
    layer_corrections = bcos or BcosCorrections(run).layer
    for index in klt.layers():
        experts = layer_experts(source, index)
        quantized = codes.quantized_layer(experts, klt, index, "cpu")
        install_corrections(model.model.layers[index], source.adapter, experts, quantized, layer_corrections(index))
    return model.eval()


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_packed_logits_equal_fake_quantized(model_type, tiny_model_dir, calib_text, tmp_path):
    from kbvq_cli import load_quantized

    model_dir = tiny_model_dir(model_type)
    run = tmp_path / "run"
    quantize(model_dir, calib_text, run)
    ids = torch.randint(0, CONFIGS[model_type].get("vocab_size", 320), (2, 24), generator=torch.Generator().manual_seed(0))
    packed = load_quantized(run / "pack")
    assert type(packed).__name__ == type(fake_quantized_model(model_dir, run)).__name__
    with torch.no_grad():
        expected = fake_quantized_model(model_dir, run)(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3), (got - expected).abs().max()
    generated = packed.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.parametrize("bits,dim", [(2, 4), (3, 4), (4, 2)])
def test_formula_bits_equal_packed_bits(bits, dim, tiny_model_dir, calib_text, tmp_path):
    run = tmp_path / "run"
    quantize(tiny_model_dir("qwen2_moe"), calib_text, run, bits=bits, dim=dim)
    storage = StageDir.open_finished(run, "pack").manifest["summary"]["storage"]
    assert abs(storage["bits_per_expert_weight"] - storage["formula_bits_per_expert_weight"]) < 0.01
    # The nominal bits are all of the indices' share: the rest is codebooks, basis and corrections.
    assert storage["parts"]["indices"] * 8 == pytest.approx(bits * storage["expert_weights"], abs=8 * 3 * 2 * 9)
    config = json.loads((run / "pack" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits and config["quantization_config"]["vector_length"] == dim


def test_formula_counts_an_output_side_shared_part(tiny_model_dir, calib_text, tmp_path):
    """`--down output` shares a k x oc basis with k x ic coefficients: the formula must count that side."""
    run = tmp_path / "run"
    quantize(tiny_model_dir("mixtral"), calib_text, run, down="output")
    storage = StageDir.open_finished(run, "pack").manifest["summary"]["storage"]
    assert abs(storage["bits_per_expert_weight"] - storage["formula_bits_per_expert_weight"]) < 0.01


def test_storage_parts_match_the_shards(tiny_model_dir, calib_text, tmp_path):
    from kbvq_cli.packed.storage import category

    run = tmp_path / "run"
    quantize(tiny_model_dir("qwen2_moe"), calib_text, run)
    pack = StageDir.open_finished(run, "pack")
    counted = {}
    for unit in pack.unit_names():
        for name, tensor in pack.read_unit(unit).items():
            counted[category(name)] = counted.get(category(name), 0) + tensor.numel() * tensor.element_size()
    assert counted == {k: v for k, v in pack.manifest["summary"]["storage"]["parts"].items() if v}
    source = ModelSource(str(tiny_model_dir("qwen2_moe")))
    total = sum(source.tensor(name).numel() for name in source.weight_map)
    assert pack.manifest["summary"]["storage"]["model_weights"] == total


def test_plain_vq_pack_has_no_shared_part_and_no_corrections(tiny_model_dir, calib_text, tmp_path):
    from kbvq_cli import load_quantized

    run = tmp_path / "run"
    quantize(tiny_model_dir("qwen2_moe"), calib_text, run, rank=0, mode="none")
    storage = StageDir.open_finished(run, "pack").manifest["summary"]["storage"]
    assert storage["parts"]["shared_basis"] == storage["parts"]["scale_shift"] == 0
    assert abs(storage["bits_per_expert_weight"] - storage["formula_bits_per_expert_weight"]) < 0.01
    model = load_quantized(run)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_pack_refuses_a_missing_stage_and_a_corrupt_shard(tiny_model_dir, calib_text, tmp_path):
    from kbvq_cli import load_quantized

    run = tmp_path / "run"
    invoke("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 8,
           "--seqlen", 64, "--run", run)
    result = invoke("pack", "--run", run, code=2)
    assert "klt-svd has not been run" in result.output
    other = tmp_path / "other"
    quantize(tiny_model_dir("qwen2_moe"), calib_text, other)
    shard = other / "pack" / f"{layer_unit(0)}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from kbvq_cli.errors import KbvqError

    with pytest.raises(KbvqError, match="corrupt"):
        load_quantized(other / "pack")
    with pytest.raises(KbvqError, match="not a packed kbvq model"):
        load_quantized(tmp_path)


def test_out_copy_loads_and_dense_export_matches(tiny_model_dir, calib_text, tmp_path):
    """--out copies a loadable model; --dense folds the scales into plain weights and drops the shifts
    (which the original architecture cannot hold): it equals the fake-quantized model without shifts."""
    from transformers import AutoModelForCausalLM

    from kbvq_cli import load_quantized

    model_dir, run, out = tiny_model_dir("qwen3_moe"), tmp_path / "run", tmp_path / "exported"
    quantize(model_dir, calib_text, run)
    invoke("pack", "--run", run, "--out", out)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(load_quantized(out)(input_ids=ids).logits,
                              load_quantized(run / "pack")(input_ids=ids).logits)
        result = invoke("pack", "--run", run, "--dense")
        assert "shifts" in result.output and "dropped" in result.output
        dense = AutoModelForCausalLM.from_pretrained(str(run / "dense"), dtype=torch.float32,
                                                     experts_implementation="eager")(input_ids=ids).logits
        from stages.bcos.reader import BcosCorrections, BcosLayerUnit

        bcos = BcosCorrections(run)

        def unshifted(index):
            tensors = bcos.layer(index).to_tensors()
            return BcosLayerUnit.from_tensors({k: (torch.zeros_like(v) if k.endswith("shift") else v)
                                               for k, v in tensors.items()})

        reference = fake_quantized_model(model_dir, run, unshifted)(input_ids=ids).logits
    assert torch.allclose(dense, reference, atol=1e-4, rtol=1e-4), (dense - reference).abs().max()
    assert "quantization_config" not in json.loads((run / "dense" / "config.json").read_text())


@pytest.mark.parametrize("method,model_type", [("gptq", "qwen2_moe"), ("rtn", "deepseek_v2")])
def test_packed_scalar_baselines_equal_their_dequantized_weights(method, model_type, tiny_model_dir, calib_text,
                                                                 tmp_path):
    """RTN/GPTQ runs pack through the same path: the loaded model equals the original with every expert
    matrix replaced by its dequantized codes, and the stored bits equal codes + 16-bit scale and zero."""
    from transformers import AutoModelForCausalLM

    from kbvq_cli import load_quantized
    from kbvq_cli.experts import SHARED
    from stages.gptq.reader import GptqCodes

    model_dir, run = tiny_model_dir(model_type), tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nmethod: gptq\ngptq: {{method: {method}, bits: 3, group_size: 16}}\n")
    invoke("calibrate", "--model", model_dir, "--data", calib_text, "--samples", 8, "--seqlen", 64, "--run", run)
    invoke("gptq", "--run", run, "--recipe", recipe)
    invoke("pack", "--run", run)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    codes, adapter = GptqCodes(run), ModelSource(str(model_dir)).adapter
    for index, layer in enumerate(reference.model.layers):
        if not codes.has(index, 0):
            continue
        experts = layer.mlp.experts
        with torch.no_grad():
            for e in range(experts.gate_up_proj.shape[0]):
                unit = codes.expert(index, e)
                experts.gate_up_proj[e] = torch.cat([unit.matrix("gate"), unit.matrix("up")])
                experts.down_proj[e] = unit.matrix("down")
            for path in adapter.shared_experts:
                shared = getattr(layer.mlp, path.split(".")[-1], None)
                if shared is not None:
                    unit = codes.expert(index, SHARED)
                    for projection in ("gate", "up", "down"):
                        getattr(shared, f"{projection}_proj").weight.copy_(unit.matrix(projection))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, load_quantized(run)(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    storage = StageDir.open_finished(run, "pack").manifest["summary"]["storage"]
    assert abs(storage["bits_per_expert_weight"] - storage["formula_bits_per_expert_weight"]) < 0.01
    assert storage["parts"]["codebooks"] == storage["parts"]["shared_basis"] == 0
