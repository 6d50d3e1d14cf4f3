"""`klt-svd --target-bits`: ranks per layer and part for a bit budget, end to end through pack's measured bits."""

import json

from cli_util import invoke
from kbvq_cli.expert_shapes import expert_matrix_shapes
from kbvq_cli.model_files import ModelSource
from resume_util import shard_hashes
from stages.klt_svd.budget import CodeSize, layer_costs
from stages.klt_svd.config import KltSvdSettings
from stages.klt_svd.reader import KltSvd
from stages.report.build import write_report


def _summary(run, stage):
    return json.loads((run / stage / "manifest.json").read_text())["summary"]


def test_a_budget_lands_at_or_just_below_its_target_and_is_recorded(tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen2_moe")
    run = tmp_path / "run"
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 4, "--seqlen", 32, "--run", run)
    source = ModelSource(str(model))
    costs = layer_costs(expert_matrix_shapes(source), source.num_experts, KltSvdSettings(), CodeSize(2, 4, True))
    floor = costs.fixed_bits / costs.weights

    refused = invoke("klt-svd", "--run", run, "--target-bits", round(floor - 0.01, 2), code=2)
    assert f"below the {floor:.4f} bits per expert weight" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (run / "klt-svd").exists()

    target = round(floor + 0.3, 2)
    invoke("klt-svd", "--run", run, "--target-bits", target)
    budget = _summary(run, "klt-svd")["budget"]
    klt = KltSvd(run)
    for index in klt.layers():  # the shards hold the allocated ranks
        assert {part: meta.rank for part, meta in klt.layer(index).parts.items()} == budget["ranks"][str(index)]
    assert sum(sum(ranks.values()) for ranks in budget["ranks"].values()) > 0
    assert budget["assumes"] == {"bits": 2, "dim": 4, "corrected": True}
    assert budget["estimated_shared_part_error"] < 1

    # a kill after the first layer: the resume takes the allocation the manifest recorded, the same bytes
    before = shard_hashes(run / "klt-svd")
    manifest = json.loads((run / "klt-svd" / "manifest.json").read_text())
    del manifest["units"][sorted(manifest["units"])[-1]]
    manifest["complete"] = False
    (run / "klt-svd" / "manifest.json").write_text(json.dumps(manifest))
    invoke("klt-svd", "--run", run)
    assert shard_hashes(run / "klt-svd") == before and _summary(run, "klt-svd")["budget"] == budget

    refused = invoke("vq", "--run", run, "--dim", 2, code=2)  # not the code size the ranks were chosen for
    assert "target_bits" in refused.output and not (run / "vq").exists()
    invoke("vq", "--run", run, "--iters", 2)
    invoke("bcos", "--run", run)
    invoke("pack", "--run", run)
    measured = _summary(run, "pack")["storage"]["bits_per_expert_weight"]
    cheapest_rank = min(costs.rank_cost.values()) / costs.weights / len(klt.layers())
    assert target - cheapest_rank <= measured <= budget["estimated_bits_per_expert_weight"] <= target
    text = write_report(run, tmp_path / "report").read_text()
    assert f"chosen by `--target-bits {target}`" in text
    assert f"{budget['estimated_bits_per_expert_weight']:.4f} with these ranks" in text
