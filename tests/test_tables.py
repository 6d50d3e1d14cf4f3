"""`kbvq table`: runs a table's recipes on the mini test-bed and prints our numbers beside the paper's,
taken from the runs' own results (eval results.json, pack storage)."""

import json

from cli_util import invoke, run_cli


def test_table_15_on_the_mini_test_bed(testbed_mini_short, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "testbed-mini").symlink_to(testbed_mini_short)  # recipes name the test-bed relative to the working dir
    invoke("table", "15", "--model", "testbed-mini", "--markdown", "t15.md")
    lines = [line for line in (tmp_path / "t15.md").read_text().splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 4  # header, separator, idre-only, bcos-mean, bcos-var, kbvq
    runs = tmp_path / "runs" / "testbed-mini"
    calibrations = {(runs / v / "calibrate").resolve() for v in ("idre-only-w2", "bcos-mean-w2", "kbvq-w2")}
    assert calibrations == {(runs / "calibration" / "calibrate").resolve()}  # one calibration for all
    for variant, line in zip(("idre-only-w2", "bcos-mean-w2", "bcos-var-w2", "kbvq-w2"), lines[2:]):
        (entry,) = json.loads((runs / variant / "eval" / "results.json").read_text())["entries"].values()
        storage = json.loads((runs / variant / "pack" / "manifest.json").read_text())["summary"]["storage"]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == f"{entry['ppl']:.2f} / —"
        assert cells[-1].startswith(f"{storage['bits_per_expert_weight']:.2f} /")
    again = invoke("table", "15", "--model", "testbed-mini", "--no-run")
    assert "== vq" not in again.output


def test_table_refusals():
    assert "no recipe set for table 6" in run_cli("table", "6", "--no-run").output
    assert "unknown model 'llama'" in run_cli("table", "1", "--model", "llama", "--no-run").output
