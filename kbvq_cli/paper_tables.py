"""The paper's tables as data (tables/paper.csv), and our numbers laid out beside them.

Each cell renders as "ours / paper": "9.84 / 9.61"; "— / 9.61" where we have not measured it yet;
"9.84 / —" where the paper has no number (always the case for the test-bed model, which is not in the
paper). Rows and columns follow the paper's order, taken from the order of tables/paper.csv.
Imports only the standard library, rich and kbvq_cli.package_data, so it is cheap to import from the CLI.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from rich.table import Table

from kbvq_cli.package_data import paper_csv

Bits = Optional[float]  # the row's nominal bit width as printed; None where the paper prints none (Table 16)
RowKey = tuple[Bits, str]  # (bits, method)
MeasuredKey = tuple[Bits, str, str]  # (bits, method, metric)

PAPER_CSV = paper_csv()  # tables/paper.csv, shipped in the package (kbvq_cli/package_data.py)
CSV_COLUMNS = ["table", "model", "bits", "method", "metric", "value"]
MISSING = "—"
ALL_MODELS = "all"  # a number the paper prints once for every model of its table (Table 7 bits, Table 8 ratio)

PAPER_MODELS = ("qwen15-moe", "qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite", "deepseekmoe-16b")

METRIC_LABELS = {
    "wikitext2_ppl": "WikiText2 PPL",
    "avg_acc": "Avg Acc",
    "arc_easy": "ARC-E",
    "arc_challenge": "ARC-C",
    "hellaswag": "HellaSwag",
    "lambada_openai": "LAMBADA-O",
    "lambada_standard": "LAMBADA-S",
    "piqa": "PIQA",
    "winogrande": "WinoGrande",
    "mmlu": "MMLU",
    "mathqa": "MathQA",
    "gsm8k": "GSM8K",
    "humaneval": "HumanEval",
    "size_gb": "Size (GB)",
    "size_mb": "Size (MB)",  # ours only: the test-beds are too small for GB
    "compress_ratio_pct": "Compress ratio (%)",
    "bits_per_weight": "Bits/weight",
    "decode_tokens_per_s": "Decode (tokens/s)",
    "speedup": "Speed up",
}
ONE_DECIMAL_METRICS = frozenset({"size_gb", "size_mb", "compress_ratio_pct"})


@dataclass(frozen=True)
class PaperCell:
    """One number printed in the paper."""

    table: str
    model: str
    bits: Bits
    method: str
    metric: str
    value: float


@dataclass(frozen=True)
class TableLayout:
    """A table's rows (bits, method) and metric columns in the paper's order, and the models it covers."""

    rows: tuple[RowKey, ...]
    metrics: tuple[str, ...]
    models: tuple[str, ...]


def _parse_bits(text: str) -> Bits:
    return float(text) if text.strip() else None


def _bits_key(bits: Union[Bits, int, str]) -> Bits:
    """Normalise bits given as 2, 2.0, "2" or "2.20" to one float key; None or "" stays None."""
    if bits is None or (isinstance(bits, str) and not bits.strip()):
        return None
    return float(bits)


def _parse_row(row: dict[str, str], line: int) -> PaperCell:
    if row["model"] not in PAPER_MODELS and row["model"] != ALL_MODELS:
        raise ValueError(f"paper.csv line {line}: unknown model {row['model']!r}")
    if row["metric"] not in METRIC_LABELS:
        raise ValueError(f"paper.csv line {line}: unknown metric {row['metric']!r}")
    if not row["table"] or not row["method"]:
        raise ValueError(f"paper.csv line {line}: empty table or method")
    try:
        bits, value = _parse_bits(row["bits"]), float(row["value"])
    except ValueError as error:
        raise ValueError(f"paper.csv line {line}: {error}") from None
    return PaperCell(row["table"], row["model"], bits, row["method"], row["metric"], value)


def load_paper(path: Optional[Union[str, Path]] = None) -> list[PaperCell]:
    """Read tables/paper.csv (or `path`), checking its header, ids, numbers and that no key repeats."""
    with open(path or PAPER_CSV, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != CSV_COLUMNS:
            raise ValueError(f"paper.csv header is {reader.fieldnames}, expected {CSV_COLUMNS}")
        cells, seen = [], set()
        for line, row in enumerate(reader, start=2):
            cell = _parse_row(row, line)
            key = (cell.table, cell.model, cell.bits, cell.method, cell.metric)
            if key in seen:
                raise ValueError(f"paper.csv line {line}: duplicate cell {key}")
            seen.add(key)
            cells.append(cell)
    return cells


def paper_value(
    cells: Iterable[PaperCell], table: str, model: str, bits: Union[Bits, int, str], method: str, metric: str
) -> Optional[float]:
    """The paper's number for exactly this cell, or None where the paper prints none."""
    bits = _bits_key(bits)
    for cell in cells:
        if (cell.table, cell.model, cell.bits, cell.method, cell.metric) == (str(table), model, bits, method, metric):
            return cell.value
    return None


def _unique(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


def table_layouts(cells: Sequence[PaperCell]) -> dict[str, TableLayout]:
    """Each table's layout, rows and columns in order of first appearance in the CSV (the paper's order)."""
    layouts = {}
    for table in _unique(cell.table for cell in cells):
        mine = [cell for cell in cells if cell.table == table]
        layouts[table] = TableLayout(
            rows=_unique((cell.bits, cell.method) for cell in mine),
            metrics=_unique(cell.metric for cell in mine),
            models=_unique(cell.model for cell in mine if cell.model != ALL_MODELS),
        )
    return layouts


PAPER_CELLS: list[PaperCell] = load_paper()
TABLE_LAYOUTS: dict[str, TableLayout] = table_layouts(PAPER_CELLS)


def format_value(metric: str, value: Optional[float]) -> str:
    """Perplexity and accuracies with 2 decimals (perplexities of 1000 and more as integers); sizes with 1."""
    if value is None:
        return MISSING
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if metric.endswith("_ppl") and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}" if metric in ONE_DECIMAL_METRICS else f"{value:.2f}"


def format_bits(bits: Bits) -> str:
    return "" if bits is None else f"{bits:g}"


def _paper_index(table: str, model: str) -> dict[MeasuredKey, float]:
    """(bits, method, metric) -> paper value for one model, with the table's all-model numbers if it is in it."""
    layout = TABLE_LAYOUTS[table]
    owners = (ALL_MODELS, model) if model in layout.models else (model,)
    return {
        (cell.bits, cell.method, cell.metric): cell.value
        for owner in owners
        for cell in PAPER_CELLS
        if cell.table == table and cell.model == owner
    }


def _grid(
    table: str,
    model: str,
    measured: Mapping[MeasuredKey, float],
    rows: Optional[Sequence[RowKey]],
    metrics: Optional[Sequence[str]],
    labels: Optional[Mapping[str, str]] = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and body cells (strings) shared by the rich and markdown renderings."""
    table = str(table)
    if table not in TABLE_LAYOUTS:
        raise KeyError(f"no paper table {table!r}; tables: {', '.join(TABLE_LAYOUTS)}")
    layout = TABLE_LAYOUTS[table]
    ours = {(_bits_key(bits), method, metric): value for (bits, method, metric), value in measured.items()}
    # Without explicit rows/metrics, our extra measurements (not in the paper) come after the paper's.
    row_keys = [(_bits_key(b), m) for b, m in rows] if rows is not None else list(
        _unique(list(layout.rows) + [(bits, method) for bits, method, _ in ours])
    )
    metric_keys = list(metrics) if metrics is not None else list(
        _unique(list(layout.metrics) + [metric for _, _, metric in ours])
    )
    paper = _paper_index(table, model)
    names = {**METRIC_LABELS, **(labels or {})}
    header = ["Bits", "Method"] + [names.get(metric, metric) for metric in metric_keys]
    body = [
        [format_bits(bits), method]
        + [
            f"{format_value(metric, ours.get((bits, method, metric)))} / "
            f"{format_value(metric, paper.get((bits, method, metric)))}"
            for metric in metric_keys
        ]
        for bits, method in row_keys
    ]
    return header, body


def render_table(
    table: str,
    model: str,
    measured: Mapping[MeasuredKey, float],
    rows: Optional[Sequence[RowKey]] = None,
    metrics: Optional[Sequence[str]] = None,
    labels: Optional[Mapping[str, str]] = None,
) -> Table:
    """Paper table `table` for `model` as a rich Table, each cell "ours / paper".

    measured maps (bits, method, metric) to our number; bits may be 2, 2.0 or "2". rows and metrics
    default to the paper's layout plus any of our measurements it lacks.
    """
    header, body = _grid(table, model, measured, rows, metrics, labels)
    rendered = Table(title=f"Table {table} — {model} (ours / paper)")
    for index, name in enumerate(header):
        rendered.add_column(name, justify="left" if index < 2 else "right")
    for cells in body:
        rendered.add_row(*cells)
    return rendered


def table_to_markdown(
    table: str,
    model: str,
    measured: Mapping[MeasuredKey, float],
    rows: Optional[Sequence[RowKey]] = None,
    metrics: Optional[Sequence[str]] = None,
    labels: Optional[Mapping[str, str]] = None,
) -> str:
    """The same as render_table, as a GitHub markdown table (header, separator, one line per row)."""
    header, body = _grid(table, model, measured, rows, metrics, labels)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m kbvq_cli.paper_tables TABLE MODEL: the paper's side only
    import sys

    from rich.console import Console

    Console(markup=False, emoji=False).print(render_table(sys.argv[1], sys.argv[2], {}))
