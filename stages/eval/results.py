"""`RUN/eval/results.json`: measured entries keyed by what they measure, written atomically.

An entry's key is the hash of the model's identity, the measurement (ppl, or one task) and every
setting that changes its value, so a rerun finds what is already measured and a changed setting
never reuses a stale number.
"""

from __future__ import annotations

import json
from pathlib import Path

from kbvq_cli.atomic import atomic_write_json
from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import hash_json


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("kbvq", "torch", "transformers", "lm_eval", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def ppl_settings(settings) -> dict:
    return {"ppl_data": settings.ppl_data, "text_field": settings.text_field, "seqlen": settings.seqlen,
            "max_tokens": settings.max_tokens}


def task_settings(settings, task: str) -> dict:
    return {"task": task, "task_dir": settings.task_dir, "num_fewshot": settings.num_fewshot,
            "limit": settings.limit, "batch_size": settings.batch_size, "seed": settings.seed}


class ResultsFile:
    def __init__(self, path: Path, restart: bool = False):
        self.path = Path(path)
        self.data = {"entries": {}}
        if self.path.exists() and not restart:
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                raise KbvqError(f"{self.path} is not valid JSON; pass --restart to measure again") from None

    @staticmethod
    def keys(identity: dict, settings) -> dict[str, str]:
        """measure -> entry key, for the measurements the settings ask for."""
        keys = {}
        if settings.ppl_data != "none":
            keys["ppl"] = hash_json({"model": identity, **ppl_settings(settings)})
        for task in settings.task_list:
            keys[task] = hash_json({"model": identity, **task_settings(settings, task)})
        return keys

    def missing(self, identity: dict, settings) -> dict[str, str]:
        return {m: k for m, k in self.keys(identity, settings).items() if k not in self.data["entries"]}

    def record(self, key: str, entry: dict) -> None:
        self.data["entries"][key] = {**entry, "versions": _versions()}
        atomic_write_json(self.path, self.data)

    def entry(self, key: str) -> dict:
        return self.data["entries"][key]


def summary_of(results: ResultsFile, identity: dict, settings, model: str) -> dict:
    """The results the settings ask for, as one JSON-able object (the `--json` line)."""
    keys = results.keys(identity, settings)
    ppl = results.entry(keys["ppl"]) if "ppl" in keys else None
    tasks = {task: results.entry(keys[task])["metrics"] for task in settings.task_list}
    accuracies = [metrics.get("acc") for metrics in tasks.values()]
    known = [a for a in accuracies if a is not None]
    return {"model": model, "ppl": ppl["ppl"] if ppl else None, "ppl_data": settings.ppl_data,
            "seqlen": settings.seqlen, "tokens_scored": ppl["tokens_scored"] if ppl else None,
            "tasks": tasks, "avg_acc": sum(known) / len(known) if known and len(known) == len(accuracies) else None}
