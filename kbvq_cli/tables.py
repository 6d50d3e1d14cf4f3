"""`kbvq table N --model M`: run every recipe a paper table needs (resuming what is done) and print the
table in the paper's layout, each cell "ours / paper", with our measured bits per weight beside.

Our numbers come from the runs themselves: perplexity and accuracies from `RUN/eval/results.json`
(the entries for the recipe's eval settings), bits and sizes from `RUN/pack`'s storage record.
"""

from __future__ import annotations

from pathlib import Path

from kbvq_cli.catalogue import MODELS, TABLE_ROWS, VARIANTS, recipe_path
from kbvq_cli.errors import KbvqError

MEASURED_BITS = "bits_per_weight"  # our measured bits per expert weight, printed in every table


def _eval_summary(run: Path) -> dict | None:
    """The run's eval results for the eval settings its recipe holds, or None if not measured yet."""
    from kbvq_cli.recipe import resolve_stage
    from stages.eval.stage import recorded_summary

    if not (run / "recipe.yaml").exists():
        return None
    return recorded_summary(resolve_stage("eval", run=str(run), recipe_path=None, model=None, overrides={}))


def _storage(run: Path) -> dict | None:
    import json

    manifest = run / "pack" / "manifest.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    return data["summary"].get("storage") if data.get("complete") else None


def measured_row(run: Path, variant: str) -> dict[str, float]:
    """metric -> our value for one run (only what has been measured)."""
    values: dict[str, float] = {}
    summary = _eval_summary(run)
    if summary:
        if summary["ppl"] is not None:
            values["wikitext2_ppl"] = summary["ppl"]
        for task, metrics in summary["tasks"].items():
            if metrics.get("acc") is not None:
                values[task] = 100 * metrics["acc"]
        if summary["avg_acc"] is not None:
            values["avg_acc"] = 100 * summary["avg_acc"]
    storage = _storage(run)
    if storage:
        values[MEASURED_BITS] = storage["bits_per_expert_weight"]
        values["size_gb"] = storage["bytes_on_disk"] / 1e9
        values["size_mb"] = storage["bytes_on_disk"] / 1e6
        values["compress_ratio_pct"] = 100 * (1 - storage["bytes_on_disk"] / storage["original_bytes"])
    elif VARIANTS[variant].method == "fp16" and summary:
        values.update(_original_storage(run))
    return values


def _original_storage(run: Path) -> dict[str, float]:
    """The FP row's bits per weight and size, measured from the checkpoint (32 for a float32 test-bed)."""
    from kbvq_cli.model_files import ModelSource
    from kbvq_cli.recipe import load_recipe
    source = ModelSource(load_recipe(run / "recipe.yaml").model)
    weights, data = source.stored_totals()
    on_disk = sum((source.path / f).stat().st_size for f in set(source.weight_map.values()))
    return {MEASURED_BITS: 8 * data / weights, "size_gb": on_disk / 1e9,
            "size_mb": on_disk / 1e6, "compress_ratio_pct": 0.0}


def _check(table: str, model: str) -> None:
    if table not in TABLE_ROWS:
        raise KbvqError(f"no recipe set for table {table}; tables: {', '.join(TABLE_ROWS)}")
    if model not in MODELS:
        raise KbvqError(f"unknown model {model!r}; models: {', '.join(MODELS)}")


def run_table(table: str, model: str, run_missing: bool = True) -> dict:
    """Run (or resume) each row's recipe, then collect {(bits, method, metric): value}."""
    from kbvq_cli.console import heading
    from kbvq_cli.pipeline import run_recipe

    _check(table, model)
    recipes = _recipes(table, model)
    measured = {}
    for row in TABLE_ROWS[table]:
        # Runs live under the working directory, as the recipes' own paths (run, calibration, test-bed) do.
        run = Path(f"runs/{model}/{row.variant}")
        values = measured_row(run, row.variant)
        if run_missing and not _complete(values):
            heading(f"=== table {table}, {model}: {row.variant}")
            run = run_recipe(str(recipes[row.variant]), None)
            values = measured_row(run, row.variant)
        measured.update({(row.bits, row.method, metric): value for metric, value in values.items()})
    return measured


def _recipes(table: str, model: str) -> dict[str, Path]:
    """variant -> its shipped recipe, for every row; all are looked up first, so that a broken install
    fails before the first recipe runs, not hours later at a missing one."""
    recipes = {row.variant: recipe_path(model, row.variant) for row in TABLE_ROWS[table]}
    missing = [str(path) for path in recipes.values() if not path.is_file()]
    if missing:
        raise KbvqError(f"table {table} needs recipes this kbvq install lacks: {', '.join(missing)}; reinstall kbvq")
    return recipes


def _complete(values: dict) -> bool:
    return "wikitext2_ppl" in values and MEASURED_BITS in values


def table_metrics(table: str, model: str) -> list[str]:
    from kbvq_cli.paper_tables import TABLE_LAYOUTS

    metrics = list(TABLE_LAYOUTS[table].metrics)
    if model.startswith("testbed"):  # scored by perplexity only: no zero-shot columns; sizes in MB
        metrics = [("size_mb" if m == "size_gb" else m) for m in metrics if not _is_task(m)]
    return metrics + ([MEASURED_BITS] if MEASURED_BITS not in metrics else [])


def _is_task(metric: str) -> bool:
    return metric not in ("wikitext2_ppl", "size_gb", "size_mb", "compress_ratio_pct", "bits_per_weight")


def print_table(table: str, model: str, measured: dict, markdown: Path | None = None) -> None:
    from kbvq_cli.console import console
    from kbvq_cli.paper_tables import TABLE_LAYOUTS, render_table, table_to_markdown

    rows = [(row.bits, row.method) for row in TABLE_ROWS[table]]
    rows += [key for key in TABLE_LAYOUTS[table].rows if key not in rows and not model.startswith("testbed")]
    metrics = table_metrics(table, model)
    # The test-beds' perplexity is on their own test split, not WikiText-2 (the caption says which).
    labels = {"wikitext2_ppl": "PPL"} if model.startswith("testbed") else None
    console.print(render_table(table, model, measured, rows=rows, metrics=metrics, labels=labels))
    console.print(caption(model), soft_wrap=True)
    if markdown is not None:
        from kbvq_cli.atomic import atomic_write_text

        text = table_to_markdown(table, model, measured, rows=rows, metrics=metrics, labels=labels)
        atomic_write_text(markdown, text + "\n" + caption(model) + "\n")


def caption(model: str) -> str:
    from stages.eval.config import WIKITEXT2_TEST

    settings = MODELS[model].eval
    data, seqlen = settings.get("ppl_data", WIKITEXT2_TEST), settings.get("seqlen", 4096)
    return (f"Cells: ours / the paper's. Perplexity column: {data}, windows of {seqlen} tokens. Bits: the "
            f"paper's row label; Bits/weight: ours, measured from the packed files per expert weight (for "
            f"the FP row, the checkpoint's own bits per weight).")


def run_plus_table(testbeds: list[str], arms: list[str], seeds: list[int], run_missing: bool = True) -> list[str]:
    """`kbvq table plus`: run (resuming) each arm of kbvq_cli/plus_ablation.py on each test-bed and seed,
    and return the markdown tables, one per test-bed."""
    from kbvq_cli.package_data import recipes_dir
    from kbvq_cli.pipeline import run_recipe
    from kbvq_cli.plus_ablation import ARMS, arm_recipe, family_of, measured, run_name, table_lines

    for testbed in testbeds:
        family_of(testbed)  # refuses a directory that is not a built test-bed, before anything runs
    lines: list[str] = []
    for testbed in testbeds:
        if run_missing:
            run_recipe(str(arm_recipe(recipes_dir(), testbed, "fp16", 0)), None)
            done: set[str] = set()
            for seed in seeds:
                for arm in arms:
                    if run_name(arm, seed) in done:
                        continue  # a gptq arm: one run serves every seed
                    target = None
                    if ARMS[arm].budget:  # the paper recipe's measured bits, so that the two compare at equal bits
                        paper = run_recipe(str(arm_recipe(recipes_dir(), testbed, "kbvq-w2", seed)), None)
                        target = measured(paper)["bits"]
                    run_recipe(str(arm_recipe(recipes_dir(), testbed, arm, seed, target_bits=target)), None)
                    done.add(run_name(arm, seed))
        lines += table_lines(testbed, arms, seeds) + [""]
    return lines


def print_plus_table(testbeds: list[str], arms: str | None, seeds: str, run_missing: bool,
                     markdown: Path | None = None) -> None:
    from kbvq_cli.atomic import atomic_write_text
    from kbvq_cli.console import console
    from kbvq_cli.plus_ablation import parse_arms

    try:
        seed_list = [int(part) for part in seeds.split(",") if part]
    except ValueError:
        raise KbvqError(f"--seeds takes comma-separated integers (got {seeds!r})") from None
    if not seed_list:
        raise KbvqError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    lines = run_plus_table(testbeds, parse_arms(arms), seed_list, run_missing)
    text = "\n".join(lines)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if markdown is not None:
        atomic_write_text(markdown, text + "\n")
