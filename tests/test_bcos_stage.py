"""The closed-form `kbvq bcos` goes expert by expert: the whole-layer path's shard bytes, one What at a time."""

from __future__ import annotations

import weakref

import pytest
import torch

from cli_util import invoke
from kbvq_cli.experts import PROJECTIONS, layer_experts
from kbvq_cli.hashing import canonical_json
from kbvq_cli.model_files import ModelSource
from kbvq_cli.stage_dir import StageDir
from stages.bcos.config import BcosSettings
from stages.bcos.core import bcos_correction
from stages.bcos.stage import _layer_unit, correct_layer
from stages.calibrate.reader import Calibration
from stages.klt_svd.reader import KltSvd
from stages.vq.reader import VqCodes


@pytest.fixture(scope="module")
def run(tiny_model_dir, calib_text, tmp_path_factory):
    """A qwen2_moe run (routed and shared experts) through the closed-form bcos."""
    run, model = tmp_path_factory.mktemp("bcos-stage") / "run", tiny_model_dir("qwen2_moe")
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 8, "--seqlen", 32, "--run", run)
    invoke("klt-svd", "--run", run, "--rank", 2)
    invoke("vq", "--run", run, "--iters", 4)
    invoke("bcos", "--run", run)
    return run, ModelSource(str(model))


def whole_layer_shard(run, source, index: int) -> bytes:
    """The shard bytes of the path bcos had before it went expert by expert: every What of the layer at
    once (`quantized_layer`), projection by projection, float64 covariances cast inside the product."""
    from safetensors.torch import save

    experts = layer_experts(source, index, torch.float32, "cpu")
    quantized = VqCodes(run).quantized_layer(experts, KltSvd(run), index, "cpu")
    stats, settings = Calibration(run).layer(index), BcosSettings()
    corrections = {(projection, expert): bcos_correction(
        experts.matrix(projection, expert), quantized[(projection, expert)],
        stats.expert_input_moments(expert, projection, experts.shared_path),
        mode=settings.mode, min_tokens=settings.min_tokens, min_std_ratio=settings.min_std_ratio)
        for projection in PROJECTIONS for expert in experts.expert_ids()}
    unit, meta = _layer_unit(experts, corrections, index)  # the shard's assembly is not what changed
    tensors = {k: v.contiguous() for k, v in unit.to_tensors().items()}
    return save(tensors, metadata={"kbvq": canonical_json(meta.to_json())})


def test_shards_are_the_whole_layer_paths_bytes(run):
    run, source = run
    bcos = StageDir.open_finished(run, "bcos")
    for index in KltSvd(run).layers():
        written = (bcos.path / bcos.manifest["units"][f"layer_{index:03d}"]["file"]).read_bytes()
        assert written == whole_layer_shard(run, source, index)


def test_one_quantized_matrix_is_alive_at_a_time(run):
    """`correct_layer` asks for each What when it needs it and drops it before asking for the next: the
    matrices it was handed earlier are all freed by then (the old path held the layer's every What)."""
    run, source = run
    index = KltSvd(run).layers()[0]
    experts = layer_experts(source, index, torch.float32, "cpu")
    matrices = VqCodes(run).quantized_matrices(experts, KltSvd(run), index, "cpu")
    handed, alive_at_each_call = [], []

    def quantized(projection, expert):
        alive_at_each_call.append(sum(ref() is not None for ref in handed))
        matrix = matrices(projection, expert)
        handed.append(weakref.ref(matrix))
        return matrix

    correct_layer(experts, quantized, Calibration(run).layer(index), index, BcosSettings())
    assert len(alive_at_each_call) == 3 * len(experts.expert_ids())
    assert max(alive_at_each_call) == 0


def test_the_blockwise_covariance_is_the_whole_matrix_formula_bit_for_bit():
    """`input_moments` builds the covariance a block of rows at a time (1030 wide: two blocks, the second
    partial), in float64 or straight into float32: the whole-matrix formula's values, and that cast."""
    from kbvq_cli.moments import input_moments

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 1030, generator=generator, dtype=torch.float64) + 0.5
    sum_xxT = x.T @ x + 1e-9 * torch.randn(1030, 1030, generator=generator, dtype=torch.float64)  # not symmetric
    mean, second = x.sum(0) / 300, sum_xxT / 300
    expected = (second + second.T) / 2 - torch.outer(mean, mean)
    assert torch.equal(input_moments(x.sum(0), sum_xxT, 300).covariance, expected)
    in_float32 = input_moments(x.sum(0), sum_xxT, 300, torch.float32).covariance
    assert in_float32.dtype == torch.float32 and torch.equal(in_float32, expected.float())
