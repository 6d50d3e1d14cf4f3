"""tables/paper.csv against the paper's text, and the "ours / paper" rendering of kbvq_cli.paper_tables."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from collections import Counter

import pytest
from rich.console import Console

from kbvq_cli.paper_tables import (
    PAPER_CELLS,
    PAPER_CSV,
    TABLE_LAYOUTS,
    format_value,
    load_paper,
    paper_value,
    render_table,
    table_to_markdown,
)

# Cells per table: rows x numeric columns as printed (Table 7: 1 bits row + 2 models, x 5 ranks).
EXPECTED_COUNTS = {
    "1": 88, "2": 30, "3": 12, "4": 4, "5": 8, "6": 6, "7": 15, "8": 30, "9": 60,
    "10": 99, "11": 99, "12": 99, "13": 99, "14": 6, "15": 12, "16": 20, "17": 80,
}
SEVEN_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "lambada_standard", "piqa", "winogrande")
PER_MODEL_TABLES = {"10": "qwen15-moe", "11": "qwen3-30b-a3b", "12": "mixtral-8x7b", "13": "deepseek-v2-lite"}


def test_csv_parses_with_expected_cells_per_table():
    cells = load_paper()
    assert cells == PAPER_CELLS
    assert Counter(cell.table for cell in cells) == EXPECTED_COUNTS


def test_no_duplicate_keys_in_raw_csv():
    with open(PAPER_CSV, newline="", encoding="utf-8") as handle:
        keys = [(r["table"], r["model"], r["bits"], r["method"], r["metric"]) for r in csv.DictReader(handle)]
    assert len(keys) == len(set(keys))
    # the same bits written two ways ("2.2" / "2.20") would slip past the raw check; parsed keys catch it
    parsed = [(c.table, c.model, c.bits, c.method, c.metric) for c in PAPER_CELLS]
    assert len(parsed) == len(set(parsed))


@pytest.mark.parametrize(
    "table, model, bits, method, metric, value",
    [
        ("1", "qwen15-moe", 2, "kbvq", "wikitext2_ppl", 9.61),
        ("1", "qwen15-moe", 2, "kbvq", "avg_acc", 62.78),
        ("1", "qwen15-moe", 16, "fp16", "wikitext2_ppl", 7.22),
        ("1", "qwen15-moe", 2, "rtn", "wikitext2_ppl", 638509),
        ("1", "qwen3-30b-a3b", 2, "gptq", "wikitext2_ppl", 438.42),
        ("1", "deepseek-v2-lite", 3, "gptq", "avg_acc", 68.89),
        ("2", "qwen3-30b-a3b", 3, "bcos-only", "wikitext2_ppl", 14.32),
        ("2", "qwen3-30b-a3b", 3, "idre-only", "winogrande", 66.92),
        ("3", "qwen15-moe", 2, "svd-no-klt", "arc_challenge", 43.59),
        ("4", "qwen3-30b-a3b", 2.01, "rank-0", "wikitext2_ppl", 15.30),
        ("4", "qwen3-30b-a3b", "2.20", "rank-1/32", "wikitext2_ppl", 11.01),
        ("5", "qwen15-moe", 2, "vptq+kbvq", "wikitext2_ppl", 8.78),
        ("5", "qwen15-moe", 2, "gptvq+bcos", "wikitext2_ppl", 11.97),
        ("6", "qwen3-30b-a3b", 2, "kbvq", "speedup", 1.60),
        ("7", "qwen15-moe", 2.05, "rank-1/256", "wikitext2_ppl", 20.71),
        ("7", "all", 2.15, "rank-1/48", "bits_per_weight", 2.15),
        ("8", "qwen15-moe", 16, "fp16", "size_gb", 27.9),
        ("8", "mixtral-8x7b", 2.25, "gptq", "size_gb", 13.5),
        ("8", "all", 2, "rtn", "compress_ratio_pct", 87.5),
        ("9", "mixtral-8x7b", 16, "fp16", "wikitext2_ppl", 3.84),
        ("9", "qwen15-moe", 4, "kbvq", "arc_easy", 69.05),
        ("10", "qwen15-moe", 3, "rtn", "lambada_standard", 0.02),
        ("11", "qwen3-30b-a3b", 2, "moequant", "wikitext2_ppl", 37465),
        ("12", "mixtral-8x7b", 2, "kbvq", "lambada_openai", 80.57),
        ("13", "deepseek-v2-lite", 3, "gptq", "lambada_openai", 70.4),
        ("14", "qwen15-moe", 2, "svd-no-klt", "wikitext2_ppl", 11.77),
        ("15", "qwen15-moe", 2, "bcos-var", "arc_challenge", 36.70),
        ("16", "mixtral-8x7b", None, "eac-moe", "compress_ratio_pct", 84),
        ("17", "deepseekmoe-16b", 2, "kbvq", "gsm8k", 17.32),
        ("17", "mixtral-8x7b", 16, "fp16", "humaneval", 32.93),
    ],
)
def test_spot_checks_against_paper_text(table, model, bits, method, metric, value):
    assert paper_value(PAPER_CELLS, table, model, bits, method, metric) == value


def test_missing_cell_is_none():
    assert paper_value(PAPER_CELLS, "1", "testbed", 2, "kbvq", "wikitext2_ppl") is None
    assert paper_value(PAPER_CELLS, "2", "qwen3-30b-a3b", 3, "kbvq", "lambada_openai") is None


def test_table1_equals_appendix_tables():
    """Table 1's W2 / Avg Acc are repeated in Tables 10-13: a check on both transcriptions."""
    for table, model in PER_MODEL_TABLES.items():
        for bits, method in TABLE_LAYOUTS[table].rows:
            for metric in ("wikitext2_ppl", "avg_acc"):
                appendix = paper_value(PAPER_CELLS, table, model, bits, method, metric)
                assert paper_value(PAPER_CELLS, "1", model, bits, method, metric) == appendix, (table, method)


def test_appendix_avg_is_mean_of_seven_tasks():
    """AVG in Tables 10-13 is the mean of the seven tasks, to rounding; catches a mistyped accuracy."""
    known_off = {("11", 16.0, "fp16")}  # the paper's own: 70.24 printed, tasks average 70.52 (README)
    for table, model in PER_MODEL_TABLES.items():
        for bits, method in TABLE_LAYOUTS[table].rows:
            tasks = [paper_value(PAPER_CELLS, table, model, bits, method, task) for task in SEVEN_TASKS]
            avg = paper_value(PAPER_CELLS, table, model, bits, method, "avg_acc")
            off = abs(sum(tasks) / len(tasks) - avg)
            assert (off > 0.03) == ((table, bits, method) in known_off), (table, bits, method, off)


def test_every_table_has_a_layout_in_paper_order():
    assert set(TABLE_LAYOUTS) == set(EXPECTED_COUNTS) == {cell.table for cell in PAPER_CELLS}
    assert TABLE_LAYOUTS["1"].metrics == ("wikitext2_ppl", "avg_acc")
    assert TABLE_LAYOUTS["1"].rows[:2] == ((16.0, "fp16"), (2.0, "rtn"))
    assert TABLE_LAYOUTS["1"].rows[-1] == (3.0, "kbvq") and len(TABLE_LAYOUTS["1"].rows) == 11
    assert TABLE_LAYOUTS["10"].metrics == ("wikitext2_ppl",) + SEVEN_TASKS + ("avg_acc",)
    assert TABLE_LAYOUTS["8"].metrics == ("compress_ratio_pct", "size_gb")
    assert TABLE_LAYOUTS["7"].models == ("qwen15-moe", "qwen3-30b-a3b")
    for layout in TABLE_LAYOUTS.values():
        assert layout.rows and layout.metrics and layout.models


def _text(table) -> str:
    console = Console(width=250, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


def test_render_table_ours_beside_paper():
    measured = {(2, "kbvq", "wikitext2_ppl"): 9.8412, ("3", "rtn", "wikitext2_ppl"): 123456.7}
    rendered = render_table("1", "qwen15-moe", measured)
    assert len(rendered.rows) == 11 and len(rendered.columns) == 4
    text = _text(rendered)
    assert "9.84 / 9.61" in text  # measured and printed
    assert "— / 62.78" in text  # not measured yet
    assert "123457 / 116689" in text  # large perplexities as integers
    assert "— / 638509" in text


def test_render_table_testbed_has_no_paper_side():
    text = _text(render_table("1", "testbed", {(2, "kbvq", "wikitext2_ppl"): 9.84}))
    assert "9.84 / —" in text and "— / —" in text
    assert "9.61" not in text


def test_all_model_cells_show_for_the_tables_models_only():
    assert "— / 87.5" in _text(render_table("8", "qwen3-30b-a3b", {}))
    assert "— / 2.15" in _text(render_table("7", "qwen3-30b-a3b", {}))
    assert "87.5" not in _text(render_table("8", "testbed", {}))


def test_explicit_rows_metrics_and_extra_measurements():
    rendered = render_table("2", "qwen3-30b-a3b", {}, rows=[(3, "kbvq")], metrics=["wikitext2_ppl"])
    assert len(rendered.rows) == 1 and len(rendered.columns) == 3
    assert "— / 9.26" in _text(rendered)
    extra = render_table("2", "qwen3-30b-a3b", {(3, "kbvq-ours", "lambada_openai"): 61.234})
    assert len(extra.rows) == 6 and len(extra.columns) == 2 + 6 + 1
    assert "61.23 / —" in _text(extra)


def test_markdown_shape_and_cells():
    markdown = table_to_markdown("10", "qwen15-moe", {(16, "fp16", "wikitext2_ppl"): 7.2249})
    lines = markdown.strip().split("\n")
    assert len(lines) == 2 + 11  # header, separator, 11 rows
    for line in lines:
        assert line.startswith("|") and line.endswith("|")
        assert line.count("|") == 2 + 9 + 1  # bits, method, 9 metrics
    assert lines[0].startswith("| Bits | Method | WikiText2 PPL | ARC-E |")
    assert lines[2] == "| 16 | fp16 | 7.22 / 7.22 | — / 69.53 | — / 44.03 | — / 77.26 | — / 71.28 | — / 64.62 | " \
        "— / 80.47 | — / 69.30 | — / 68.07 |"


def test_format_value():
    assert format_value("wikitext2_ppl", 638509.0) == "638509"
    assert format_value("wikitext2_ppl", 438.42) == "438.42"
    assert format_value("avg_acc", 62.784) == "62.78"
    assert format_value("size_gb", 13.0) == "13.0"
    assert format_value("avg_acc", None) == "—"
    assert format_value("wikitext2_ppl", float("inf")) == "inf"


def test_unknown_table_is_refused():
    with pytest.raises(KeyError, match="no paper table"):
        render_table("99", "qwen15-moe", {})


@pytest.mark.parametrize(
    "body, message",
    [
        ("1,qwen15-moe,2,kbvq,wikitext2_ppl,9.61\n1,qwen15-moe,2.0,kbvq,wikitext2_ppl,9.61\n", "duplicate"),
        ("1,qwen15-moe,2,kbvq,wiki_ppl,9.61\n", "unknown metric"),
        ("1,llama,2,kbvq,wikitext2_ppl,9.61\n", "unknown model"),
        ("1,qwen15-moe,2,kbvq,wikitext2_ppl,9.61GB\n", "line 2"),
    ],
)
def test_load_paper_rejects_bad_files(tmp_path, body, message):
    path = tmp_path / "paper.csv"
    path.write_text("table,model,bits,method,metric,value\n" + body)
    with pytest.raises(ValueError, match=message):
        load_paper(path)


def test_import_stays_light():
    code = "import sys, kbvq_cli.paper_tables; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
