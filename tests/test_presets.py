"""Presets (`kbvq run --preset`): one definition with the shipped recipes, and the same results as them."""

import json

import pytest
import yaml

from cli_util import invoke, run_cli
from conftest import REPO
from kbvq_cli.stage_dir import StageDir

# Where a preset is the recipe of a paper table row, that recipe's variant name.
PAPER_RECIPES = {"kbvq-w2": "kbvq-w2", "kbvq-w3": "kbvq-w3", "vq-w2": "vq-w2", "gptq-w2g128": "gptq-w2",
                 "rtn-w2": "rtn-w2"}
MODEL_WIDE = ("calibrate", "eval")  # what a model's recipes add to every variant


def test_every_preset_parses_under_its_stages_settings():
    from kbvq_cli.presets import PRESETS, check_presets

    check_presets()
    assert {name for name, preset in PRESETS.items() if preset.paper} == set(PAPER_RECIPES)
    assert {"kbvq-w2-plus", "kbvq-w3-plus"} <= set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PAPER_RECIPES))
def test_the_paper_presets_are_the_shipped_recipes(preset):
    """qwen15-moe's recipes take no model-wide klt-svd rank: their stage settings are the preset's alone."""
    from kbvq_cli.presets import PRESETS

    shipped = yaml.safe_load((REPO / "recipes" / "qwen15-moe" / f"{PAPER_RECIPES[preset]}.yaml").read_text())
    stages = {k: v for k, v in shipped.items() if k not in MODEL_WIDE + ("model", "run", "method", "calibration",
                                                                         "description")}
    assert stages == PRESETS[preset].stages and shipped["method"] == PRESETS[preset].method


def test_a_recipe_file_may_start_from_a_preset(tmp_path):
    from kbvq_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: m\npreset: vq-w2\nvq: {iters: 7}\n")
    recipe = load_recipe(path)
    assert recipe.method == "kbvq"
    assert recipe.stages == {"vq": {"bits": 2, "iters": 7}, "klt-svd": {"rank": 0}, "bcos": {"mode": "none"}}
    path.write_text("model: m\npreset: kbvq-w9\n")
    result = run_cli("run", "--recipe", path, "--dry-run")
    assert result.exit_code == 2 and "unknown preset 'kbvq-w9'; use one of kbvq-w2, kbvq-w3," in result.output


def test_an_unknown_preset_is_one_line_listing_them_and_writes_nothing(tmp_path):
    result = run_cli("run", "--preset", "kbvq-w4", "--model", tmp_path / "m", "--run", tmp_path / "run")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: unknown preset 'kbvq-w4'; use one of kbvq-w2, kbvq-w3, vq-w2, gptq-w2g128, rtn-w2")
    assert not (tmp_path / "run").exists()
    result = run_cli("run", "--preset", "kbvq-w2", "--run", tmp_path / "run")
    assert result.exit_code == 2 and "--preset NAME needs --model M" in result.output
    result = run_cli("run", "--recipe", tmp_path / "r.yaml", "--samples", 4)
    assert result.exit_code == 2 and "--samples go with --preset" in result.output
    assert not (tmp_path / "run").exists()


def _stage_records(run) -> dict:
    """stage -> (config hash, inputs hash, {unit: sha256}) of every finished stage of a run."""
    records = {}
    for stage in ("calibrate", "klt-svd", "vq", "bcos", "gptq", "nonexpert"):
        if (run / stage / "manifest.json").exists():
            manifest = StageDir.open_finished(run, stage).manifest
            records[stage] = (manifest["config_hash"], manifest["inputs_hash"], manifest["units"])
    return records


# End to end for the paper's method only (about 40 s); the other presets resolve to their shipped recipes'
# settings exactly (test_the_paper_presets_are_the_shipped_recipes), through the same code path.
@pytest.mark.parametrize("preset", ["kbvq-w2"])
def test_a_paper_preset_gives_the_shipped_recipe_s_results(preset, tmp_path, tiny_model_dir, calib_text):
    """The same model and data through `--preset` and through the shipped recipe file: the same settings
    hashes, the same shards bit for bit, the same packed files and the same perplexity."""
    model = tiny_model_dir("qwen2_moe")
    recipe = yaml.safe_load((REPO / "recipes" / "qwen15-moe" / f"{PAPER_RECIPES[preset]}.yaml").read_text())
    recipe.pop("calibration")
    recipe.update(model=str(model), calibrate={"data": str(calib_text), "samples": 8, "seqlen": 32},
                  eval={"ppl_data": str(calib_text), "seqlen": 32, "tasks": "none"})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    invoke("run", "--recipe", path, "--run", tmp_path / "from-recipe")
    invoke("run", "--preset", preset, "--model", model, "--run", tmp_path / "from-preset", "--data", calib_text,
           "--samples", 8, "--seqlen", 32, "--ppl-data", calib_text, "--tasks", "none")
    ours, theirs = _stage_records(tmp_path / "from-preset"), _stage_records(tmp_path / "from-recipe")
    assert ours == theirs and {"calibrate", "nonexpert"} < set(ours)
    packs = [json.loads((tmp_path / run / "pack" / "manifest.json").read_text()) for run in ("from-preset", "from-recipe")]
    assert packs[0]["units"] == packs[1]["units"] and packs[0]["config_hash"] == packs[1]["config_hash"]
    results = [json.loads((tmp_path / run / "eval" / "results.json").read_text())["entries"]
               for run in ("from-preset", "from-recipe")]
    assert [entry["ppl"] for entry in results[0].values()] == [entry["ppl"] for entry in results[1].values()]


def test_target_bits_goes_to_klt_svd_of_a_kbvq_preset_only(tmp_path):
    from kbvq_cli.presets import preset_recipe

    recipe = preset_recipe("kbvq-w2-plus", "m", None, {}, {}, target_bits=2.5)
    assert recipe.stages["klt-svd"] == {"target_bits": 2.5} and recipe.stages["vq"]["refine_iters"] == 4
    assert "klt-svd" not in preset_recipe("kbvq-w2", "m", None, {}, {}).stages  # the paper preset untouched
    result = run_cli("run", "--preset", "gptq-w2g128", "--model", tmp_path / "m", "--run", tmp_path / "run",
                     "--target-bits", 2.5)
    assert result.exit_code == 2 and "preset gptq-w2g128 is gptq" in result.output
    assert not (tmp_path / "run").exists()
