"""The whole method on the trained mini test-bed (what `make demo` runs), and KBVQ against plain VQ on it.

Needs `testbed-mini/` (`make testbed-mini`, about a minute). CI builds it first; elsewhere the test
is skipped with that instruction when it is absent.
"""

import json
from pathlib import Path

import yaml

from cli_util import invoke
from conftest import REPO
from kbvq_cli.stage_dir import StageDir
from test_method_end_to_end import held_out_block_inputs, output_error


def run_recipe(testbed: Path, tmp_path: Path, name: str, **stage_overrides) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "testbed-mini" / "kbvq-w2.yaml").read_text())
    recipe["model"] = str(testbed)
    recipe["calibration"] = str(tmp_path / "calibration")  # one calibration for both runs
    recipe["calibrate"]["data"] = str(testbed / "calib.txt")
    recipe["eval"]["ppl_data"] = str(testbed / "test.txt")
    for stage, settings in stage_overrides.items():
        recipe.setdefault(stage.replace("_", "-"), {}).update(settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    invoke("run", "--recipe", path, "--run", tmp_path / name)
    return tmp_path / name


def test_kbvq_on_the_trained_test_bed(testbed_mini, tmp_path):
    kbvq = run_recipe(testbed_mini, tmp_path, "kbvq")
    summary = {stage: StageDir.open_finished(kbvq, stage).manifest["summary"] for stage in ("klt-svd", "vq", "bcos")}
    assert 0 < summary["klt-svd"]["mean_rho_k"] < 1
    assert summary["vq"]["mean_relative_output_error"] < summary["vq"]["mean_relative_output_error_shared_part_only"]
    assert summary["bcos"]["mean_relative_output_error_after"] < summary["bcos"]["mean_relative_output_error_before"]
    results = json.loads((kbvq / "eval" / "results.json").read_text())["entries"]
    (entry,) = results.values()
    assert entry["ppl"] > 1 and entry["tokens_scored"] > 30000
    plain = run_recipe(testbed_mini, tmp_path, "plain", klt_svd={"rank": 0}, bcos={"mode": "none"})
    assert (plain / "calibrate").resolve() == (kbvq / "calibrate").resolve() == (tmp_path / "calibration" / "calibrate")
    inputs = held_out_block_inputs(testbed_mini, testbed_mini / "val.txt")
    assert output_error(kbvq, testbed_mini, inputs) < output_error(plain, testbed_mini, inputs)
