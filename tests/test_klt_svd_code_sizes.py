"""`klt-svd --target-bits B --code-sizes ...`: a budget that also chooses the VQ code size per layer and
projection, end to end: calibrate -> klt-svd -> vq -> bcos -> pack -> load, bits by the formula and at most
B, the packed runtime equal to the reference loader, a resume giving the same bytes."""

import json

import torch

from cli_util import invoke
from kbvq_cli.expert_shapes import expert_matrix_shapes
from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.model_files import ModelSource
from kbvq_cli.packed.schema import PackedUnitMeta
from resume_util import shard_hashes
from stages.klt_svd.budget import CodeSize, layer_costs
from stages.klt_svd.config import KltSvdSettings
from stages.report.build import write_report
from stages.vq.reader import VqCodes
from test_packed_runtime import assert_close, load_both, random_ids

CANDIDATES = "2x2,3x2"


def _manifest(run, stage):
    return json.loads((run / stage / "manifest.json").read_text())


def _costs(model, rank=None):
    source = ModelSource(str(model))
    settings = KltSvdSettings(rank=rank, target_bits=1.0, code_sizes=tuple(CANDIDATES.split(",")))
    code = CodeSize(2, 4, True)
    return layer_costs(expert_matrix_shapes(source), source.num_experts, settings, code, code.candidates(settings))


def _kill_last_unit(stage_dir):
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    del manifest["units"][sorted(manifest["units"])[-1]]
    manifest["complete"] = False
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_budget_with_code_sizes_runs_through_pack_and_loads(tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen2_moe")
    run = tmp_path / "run"
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 4, "--seqlen", 32, "--run", run)
    costs = _costs(model)
    # halfway between every projection at 2x2 and every one at 3x2 (rank 0): room for some upgrades and ranks
    at = lambda size: sum(found[size] for found in costs.code_cost.values()) / costs.weights  # noqa: E731
    target = round((at("2x2") + at("3x2")) / 2, 2)
    invoke("klt-svd", "--run", run, "--target-bits", target, "--code-sizes", CANDIDATES)
    budget = _manifest(run, "klt-svd")["summary"]["budget"]
    chosen = {size for sizes in budget["code_sizes"].values() for size in sizes.values()}
    assert len(chosen) > 1, budget["code_sizes"]  # a mixed allocation: what the rest of the test is about
    assert set(budget["code_error_factors"]["0"]["gate"]) == {"2x4", "2x2", "3x2"}

    before = shard_hashes(run / "klt-svd")
    _kill_last_unit(run / "klt-svd")  # the resume takes the recorded allocation
    invoke("klt-svd", "--run", run)
    assert shard_hashes(run / "klt-svd") == before

    invoke("vq", "--run", run, "--iters", 2)
    codes = VqCodes(run)
    for layer, sizes in budget["code_sizes"].items():  # vq quantized each projection at its chosen size
        unit = codes.expert(int(layer), 0)
        assert {p: "{}x{}".format(*unit.code_size(p)) for p in PROJECTIONS} == sizes
    before = shard_hashes(run / "vq")
    _kill_last_unit(run / "vq")
    invoke("vq", "--run", run, "--iters", 2)
    assert shard_hashes(run / "vq") == before

    invoke("bcos", "--run", run)
    invoke("pack", "--run", run)
    storage = _manifest(run, "pack")["summary"]["storage"]
    padding = 7 * 3 * costs.projection_matrices * len(budget["code_sizes"]) / storage["expert_weights"]
    assert abs(storage["formula_bits_per_expert_weight"] + padding - budget["estimated_bits_per_expert_weight"]) < 1e-5
    assert storage["formula_bits_per_expert_weight"] <= storage["bits_per_expert_weight"]
    assert storage["bits_per_expert_weight"] <= budget["estimated_bits_per_expert_weight"] <= target

    pack = run / "pack"
    shard = next(pack.glob("layer_000*.safetensors"))
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as handle:
        meta = PackedUnitMeta.from_json(json.loads(handle.metadata()["kbvq"]))
    assert {p: "{}x{}".format(*meta.code_size(p)) for p in PROJECTIONS} == budget["code_sizes"]["0"]
    packed, reference = load_both(pack)
    ids = random_ids("qwen2_moe")
    with torch.no_grad():
        assert_close(packed(input_ids=ids).logits, reference(input_ids=ids).logits)

    text = write_report(run, tmp_path / "report").read_text()
    assert "Code sizes were chosen too" in text and f"**{budget['code_sizes']['0']['gate']}**" in text


def test_rank_0_with_code_sizes_chooses_sizes_only(tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen2_moe")
    run = tmp_path / "run"
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 4, "--seqlen", 32, "--run", run)
    costs = _costs(model, rank=0)
    target = round(costs.fixed_bits / costs.weights, 2)  # what vq's own size costs at rank 0
    invoke("klt-svd", "--run", run, "--rank", 0, "--target-bits", target, "--code-sizes", CANDIDATES)
    budget = _manifest(run, "klt-svd")["summary"]["budget"]
    assert all(rank == 0 for ranks in budget["ranks"].values() for rank in ranks.values())
    assert budget["estimated_bits_per_expert_weight"] <= target
    assert budget["estimated_shared_part_error"] == 1.0  # no shared part: VQ quantizes everything


def test_bad_code_sizes_are_refused_in_one_line_with_nothing_written(tiny_model_dir, calib_text, tmp_path):
    model = tiny_model_dir("qwen2_moe")
    run = tmp_path / "run"
    invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 4, "--seqlen", 32, "--run", run)
    for args, says in ((("--target-bits", 5, "--code-sizes", "2x8"), "'2x8': dim=8 is not supported"),
                       (("--target-bits", 5, "--code-sizes", "three"), "'three' is not BITSxDIM"),
                       (("--code-sizes", "2x2"), "code_sizes goes with target_bits"),
                       (("--rank", 0, "--target-bits", 5), "rank 0 with target_bits leaves the budget nothing"),
                       (("--target-bits", 0.5, "--code-sizes", "2x2"), "below the")):
        refused = invoke("klt-svd", "--run", run, *args, code=2)
        assert says in refused.output and len(refused.output.strip().splitlines()) == 1, refused.output
        assert not (run / "klt-svd").exists()
    recipe = tmp_path / "refine.yaml"  # a size the run's other vq settings refuse (refinement's codebook limit)
    recipe.write_text(f"model: {model}\nrun: {run}\nvq: {{refine_iters: 4}}\n"
                      f"klt-svd: {{target_bits: 5, code_sizes: [\"2x2\", \"3x4\"]}}\n")
    refused = invoke("klt-svd", "--recipe", recipe, code=2)
    assert "code_sizes 3x4 does not go with this run's vq settings" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (run / "klt-svd").exists()


def test_packs_without_code_sizes_keep_their_metadata():
    """A layer at vq's own size writes no `code_sizes`, and an old shard's metadata reads as before."""
    old = {"storage": {}, "layer": 0, "moe": True, "format": "vq", "bits": 2, "shapes": {"gate": [32, 64]},
           "shared_path": None, "dim": 4, "corrected": True, "shared_stacked": {}, "parts": {}}
    meta = PackedUnitMeta.from_json(old)
    assert meta.to_json() == old and meta.code_size("down") == (2, 4) and meta.projection_width("up") == 8
    mixed = PackedUnitMeta.from_json({**old, "code_sizes": {"gate": [3, 2], "up": [2, 4], "down": [2, 2]}})
    assert mixed.projection_width("gate") == 6 and mixed.projection_width("down") == 4
    assert PackedUnitMeta.from_json(mixed.to_json()) == mixed
