"""calibrate -> klt-svd -> vq -> bcos on a tiny model: KBVQ's experts beat plain VQ on held-out tokens."""

import pytest
import torch

from cli_util import invoke
from kbvq_cli.experts import layer_experts
from kbvq_cli.model_files import ModelSource
from resume_util import kill_after_units, run_to_end, shard_hashes
from stages.bcos.reader import BcosCorrections
from stages.klt_svd.reader import KltSvd
from stages.vq.reader import VqCodes
from tiny_models import build_tiny_model, write_text



def pipeline(model, text, run, rank, mode, bits=2):
    invoke("calibrate", "--model", model, "--data", text, "--samples", 16, "--seqlen", 64, "--run", run)
    invoke("klt-svd", "--run", run, "--rank", rank)
    invoke("vq", "--run", run, "--bits", bits, "--iters", 25)
    invoke("bcos", "--run", run, "--mode", mode)


def held_out_block_inputs(model_dir, text_path):
    """Per MoE layer: the FP block input [T, H] and top-k routing on text the calibration never saw."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, experts_implementation="eager")
    ids = AutoTokenizer.from_pretrained(str(model_dir))(text_path.read_text())["input_ids"][:1024]
    captured, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, index=index):
            captured[index] = (args[0].detach().clone(), args[1].detach().clone())
        handles.append(layer.mlp.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return captured


def output_error(run, model_dir, inputs) -> float:
    """Sum over layers, experts and projections of ||y_corr - y||^2 on each expert's routed tokens."""
    from kbvq_cli.stage_dir import StageDir

    source, klt, codes = ModelSource(str(model_dir)), KltSvd(run), VqCodes(run)
    bcos = BcosCorrections(run)
    total = 0.0
    for index, (x, routing) in inputs.items():
        experts = layer_experts(source, index)
        quantized = codes.quantized_layer(experts, klt, index, "cpu")
        corrections = bcos.layer(index)
        for e in range(experts.num_experts):
            tokens = (routing == e).any(1)
            xe = x[tokens]
            w_gate, w_up = experts.matrix("gate", e), experts.matrix("up", e)
            h = torch.nn.functional.silu(xe @ w_gate.T) * (xe @ w_up.T)
            for projection, inp in (("gate", xe), ("up", xe), ("down", h)):
                y = inp @ experts.matrix(projection, e).T
                scale = corrections.of(projection, e).scale.float()
                shift = corrections.of(projection, e).shift.float()
                y_corr = (1 + scale) * (inp @ quantized[(projection, e)].T) + shift
                total += float((y_corr - y).pow(2).sum())
    return total


def test_kbvq_beats_plain_vq_on_held_out_tokens(tmp_path, calib_text):
    # 2 bits: at 3 bits a tiny matrix has fewer sub-vectors than the 4096 codewords, and VQ is exact.
    bits = 2
    model = build_tiny_model("qwen3_moe", tmp_path / "model", num_hidden_layers=2, moe_intermediate_size=64)
    held_out = write_text(tmp_path / "held_out.txt", n_sentences=300, seed=7)
    pipeline(model, calib_text, tmp_path / "kbvq", rank=8, mode="full", bits=bits)
    pipeline(model, calib_text, tmp_path / "plain", rank=0, mode="none", bits=bits)
    inputs = held_out_block_inputs(model, held_out)
    kbvq_error, plain_error = output_error(tmp_path / "kbvq", model, inputs), output_error(tmp_path / "plain", model, inputs)
    assert kbvq_error < plain_error, (kbvq_error, plain_error)


@pytest.mark.slow
def test_method_stages_resume_after_sigkill(tmp_path, calib_text):
    model = build_tiny_model("qwen2_moe", tmp_path / "model", num_hidden_layers=3, hidden_size=128,
                             moe_intermediate_size=128, shared_expert_intermediate_size=128)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 8, "--seqlen", 64, "--run", run)
        invoke("klt-svd", "--run", run, "--rank", 2)
    vq = ["vq", "--bits", "2", "--iters", "10"]  # a kill-and-resume test: the codebooks need not be good
    run_to_end(vq + ["--run", str(straight)])
    assert kill_after_units(vq + ["--run", str(killed)], killed / "vq", units=3) == 3
    run_to_end(vq + ["--run", str(killed)])
    assert shard_hashes(killed / "vq") == shard_hashes(straight / "vq")
    for run in (straight, killed):
        invoke("bcos", "--run", run)
    assert shard_hashes(killed / "bcos") == shard_hashes(straight / "bcos")
