"""`kbvq eval`: perplexity and zero-shot accuracy of a packed model or of an original checkpoint.

One code path for both (the FP16 row and the quantized rows differ only in how the model is loaded).
Results accumulate in `RUN/eval/results.json`, one entry per (model identity, measurement, settings):
a rerun with the same settings reuses them, a changed setting adds a new entry.
"""

from __future__ import annotations

import time
from pathlib import Path

from kbvq_cli.console import console, info, progress_bar
from kbvq_cli.hashing import hash_json
from kbvq_cli.recipe import ResolvedStage
from stages.eval.results import ResultsFile, ppl_settings, summary_of, task_settings

STAGE = "eval"


def model_identity(path: Path, packed: bool) -> dict:
    """What the results belong to: the pack's manifest hash, or the checkpoint's file hashes."""
    if packed:
        from kbvq_cli.packed.integrity import open_pack
        from stages.eval.reader import packed_identity

        return packed_identity(open_pack(path))  # loading it hashes every file; naming it needs the manifest
    from kbvq_cli.model_files import ModelSource

    return {"kind": "original", "fingerprint": hash_json(ModelSource(str(path)).fingerprint())}


def is_packed(path: Path) -> bool:
    import json

    manifest = path / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("stage") == "pack"


def eval_target(resolved: ResolvedStage, model_dir: str | None = None) -> tuple[Path, bool]:
    """(the model directory to evaluate, whether it is a packed kbvq model): `model_dir` if given, else
    the run's original checkpoint (`target: original`, the FP row) or its `pack` directory."""
    from kbvq_cli.model_files import resolve_model_path

    if model_dir is not None:
        path = resolve_model_path(model_dir)
        return path, is_packed(path)
    if resolved.settings.target == "original":
        from kbvq_cli.stage_run import require_model

        return resolve_model_path(require_model(resolved)), False
    return resolved.run_dir / "pack", True


def recorded_summary(resolved: ResolvedStage) -> dict | None:
    """The results the run's eval settings ask for, if all are in results.json (nothing is measured)."""
    path = resolved.run_dir / STAGE / "results.json"
    if not path.exists():
        return None
    target, packed = eval_target(resolved)
    results, identity = ResultsFile(path), model_identity(target, packed)
    if results.missing(identity, resolved.settings):
        return None
    return summary_of(results, identity, resolved.settings, str(target))


def _check_pack_lineage(resolved: ResolvedStage) -> None:
    """The run's pack must be of the model this command names (a `--recipe` may name another)."""
    if resolved.model is None or not (resolved.run_dir / "pack" / "manifest.json").exists():
        return
    from kbvq_cli.lineage import check_lineage
    from kbvq_cli.model_files import ModelSource
    from kbvq_cli.stage_dir import StageDir

    pack = StageDir.open_finished(resolved.run_dir, "pack")
    check_lineage(resolved.run_dir, {"model": ModelSource(resolved.model).fingerprint()},
                  {"model": resolved.model}, {"pack": pack})


def load_model(path: Path, packed: bool, device: str):
    from kbvq_cli.model_files import ModelSource, load_tokenizer

    if packed:
        from kbvq_cli.packed.loader import load_quantized

        model = load_quantized(path, device=device)
    else:
        from transformers import AutoModelForCausalLM

        ModelSource(str(path))  # refuses unknown architectures and broken configs with a one-line error
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to(device).eval()
    return model, load_tokenizer(path)


def run(resolved: ResolvedStage, restart: bool = False, model_dir: str | None = None, as_json: bool = False) -> dict:
    from kbvq_cli.streaming import pick_device

    from kbvq_cli.recipe import save_run_recipe

    settings = resolved.settings
    path, packed = eval_target(resolved, model_dir)
    if packed and model_dir is None:
        _check_pack_lineage(resolved)
    identity = model_identity(path, packed)
    save_run_recipe(resolved)  # only once every check has passed: a refused command changes nothing
    results = ResultsFile(resolved.run_dir / STAGE / "results.json", restart)
    todo = results.missing(identity, settings)
    if todo:
        device = pick_device(settings.device)
        started = time.time()
        model, tokenizer = load_model(path, packed, device)
        _measure(results, identity, settings, todo, model, tokenizer, device)
        info(f"eval: {path} in {time.time() - started:.1f}s")
        if packed:
            _refresh_model_card(path, results.path, identity)
    else:
        info(f"eval: reusing the results in {results.path} (same model and settings)")
    summary = summary_of(results, identity, settings, str(path))
    _show(summary, as_json)
    return summary


def _refresh_model_card(path: Path, results_path: Path, identity: dict) -> None:
    """The evaluated pack's README.md, with every result recorded for it."""
    from kbvq_cli.packed.integrity import open_pack
    from kbvq_cli.packed.model_card import write_model_card
    from stages.eval.reader import card_rows

    write_model_card(open_pack(path), card_rows(results_path, identity))


def _measure(results: "ResultsFile", identity: dict, settings, todo: dict, model, tokenizer, device) -> None:
    if "ppl" in todo:
        from kbvq_cli.data import load_documents
        from kbvq_cli.perplexity import perplexity, token_stream, windows

        ids = token_stream(load_documents(settings.ppl_data, settings.text_field, "test", "--ppl-data"),
                           tokenizer, settings.max_tokens)
        with progress_bar() as progress:
            task = progress.add_task("perplexity windows", total=windows(ids, settings.seqlen).shape[0])
            measured = perplexity(model, ids, settings.seqlen, device=device, on_batch=lambda _: progress.advance(task))
        results.record(todo["ppl"], {"measure": "ppl", "model": identity, "settings": ppl_settings(settings),
                                     **measured.to_json()})
    tasks = [task for task in settings.task_list if task in todo]
    if tasks:
        from stages.eval.zero_shot import zero_shot

        for task, entry in zero_shot(model, tokenizer, tasks, settings, device).items():
            results.record(todo[task], {"measure": "task", "task": task, "model": identity,
                                        "settings": task_settings(settings, task), **entry})


def _show(summary: dict, as_json: bool) -> None:
    import json

    from rich.table import Table

    table = Table(title=f"eval {summary['model']}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    if summary["ppl"] is not None:
        table.add_row(f"perplexity ({summary['ppl_data']}, seqlen {summary['seqlen']})", f"{summary['ppl']:.4f}")
    for task, metrics in summary["tasks"].items():
        table.add_row(f"{task} acc", "—" if metrics.get("acc") is None else f"{100 * metrics['acc']:.2f}")
    if summary["avg_acc"] is not None:
        table.add_row("average acc", f"{100 * summary['avg_acc']:.2f}")
    console.print(table)
    if as_json:
        print(json.dumps(summary, sort_keys=True))
