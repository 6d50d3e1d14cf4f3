"""The plus ablation's recipes and table (kbvq_cli/plus_ablation.py, `kbvq table plus`), without running arms."""

import json

import pytest
import yaml

from cli_util import run_cli
from kbvq_cli.errors import KbvqError
from kbvq_cli.package_data import recipes_dir
from kbvq_cli import plus_ablation
from kbvq_cli.plus_ablation import arm_recipe, parse_arms, table_lines


@pytest.fixture
def fake_testbed(tmp_path, monkeypatch):
    """A directory that says it is a mini test-bed (only its testbed.json is read here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "testbed.json").write_text(json.dumps({"variant": "upcycled-mini"}))
    return "tb"


def test_arms_lay_their_settings_over_the_family_recipe(fake_testbed):
    paper = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "kbvq-w2", 1).read_text())
    assert paper["model"] == "tb" and paper["calibrate"]["data"] == "tb/calib.txt"
    assert paper["run"] == "runs/tb/plus/kbvq-w2-s1" and paper["vq"]["seed"] == 1
    assert paper["calibration"] == "runs/tb/calibration" and paper["klt-svd"] == {"rank": 4}
    budget = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "budget", 1, target_bits=4.87).read_text())
    assert budget["klt-svd"] == {"target_bits": 4.87}  # in place of the recipe's rank, at the paper's bits
    eqbits = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "bcos-only-eqbits", 1, target_bits=4.87)
                            .read_text())
    assert eqbits["klt-svd"]["rank"] == 0 and eqbits["klt-svd"]["target_bits"] == 4.87
    assert "2x2" in eqbits["klt-svd"]["code_sizes"] and eqbits["run"] == "runs/tb/plus/bcos-only-eqbits-s1"
    routing = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "plus+routing-all", 2).read_text())
    assert routing["calibration"] == "runs/tb/calibration-routing-all" and routing["calibrate"]["routing"] == "all"
    assert routing["vq"]["refine_iters"] == 4 and routing["vq"]["seed"] == 2
    gptq = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "gptq-w2g128", 2).read_text())
    assert gptq["run"] == "runs/tb/plus/gptq-w2g128-s0" and "vq" not in gptq  # no seed: one run for all
    small_groups = yaml.safe_load(arm_recipe(recipes_dir(), fake_testbed, "gptq-w2g32", 1).read_text())
    assert small_groups["gptq"] == {**gptq["gptq"], "group_size": 32} and small_groups["run"].endswith("g32-s0")


def test_unknown_arms_and_bad_seeds_are_one_line(fake_testbed):
    with pytest.raises(KbvqError, match="unknown arm"):
        parse_arms("kbvq-w2,nope")
    result = run_cli("table", "plus", "--testbed", fake_testbed, "--seeds", "a", "--no-run")
    assert result.exit_code == 2 and result.output.strip().startswith("error: --seeds takes")
    result = run_cli("table", "plus", "--testbed", "missing", "--no-run")
    assert result.exit_code == 2 and "not a built test-bed" in result.output


def test_the_table_shows_arms_not_run_yet(fake_testbed):
    lines = table_lines(fake_testbed, parse_arms(None), [0, 1, 2])
    assert "FP perplexity not measured yet" in lines[0]
    assert len([line for line in lines if line.endswith("| not run | |")]) == len(parse_arms(None))


def test_the_table_gives_each_arms_loss_as_a_multiple_of_the_paper_recipes(fake_testbed, monkeypatch):
    ppl = {"kbvq-w2-s0": 101.0, "kbvq-w2-s1": 103.0, "kbvq-w2-plus-s0": 100.5, "kbvq-w2-plus-s1": 100.7}
    monkeypatch.setattr(plus_ablation, "fp_ppl", lambda testbed: 100.0)
    monkeypatch.setattr(plus_ablation, "measured", lambda run: {"bits": 2.7, "ppl": ppl[run.name], "vq_error": 0.02,
                                                               "bcos_error": None} if run.name in ppl else None)
    lines = table_lines(fake_testbed, ["kbvq-w2", "kbvq-w2-plus", "ef"], [0, 1])
    paper, plus, ef = lines[4:7]
    assert paper.endswith("| +2.000 ± 1.414 | 1.00x |") and "| 2.700 | 0.0200 | - | 102.00 |" in paper
    assert plus.endswith("| +0.600 ± 0.141 | 0.30x |")  # (0.5 + 0.7) / 2 against (1 + 3) / 2
    assert ef == "| ef | 0 | | | | | not run | |"
