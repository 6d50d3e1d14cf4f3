"""What other stages read of `kbvq eval`'s results: the measurements recorded for one packed model, as
rows for its model card (`kbvq pack` writes the card; `kbvq eval` refreshes it)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path("eval") / "results.json"


def packed_identity(stage_dir) -> dict:
    """The identity eval results of a pack are recorded under: its manifest hash (shards, settings, inputs)."""
    return {"kind": "packed", "pack": stage_dir.manifest_hash()}


def _label(entry: dict) -> tuple[str, str] | None:
    settings = entry.get("settings", {})
    if entry.get("measure") == "ppl" and entry.get("ppl") is not None:
        return f"perplexity ({settings.get('ppl_data')}, seqlen {settings.get('seqlen')})", f"{entry['ppl']:.4f}"
    if entry.get("measure") == "task":
        accuracy = entry.get("metrics", {}).get("acc")
        few_shot = f", {settings.get('num_fewshot')}-shot" if settings.get("num_fewshot") else ""
        limit = f", first {settings['limit']} documents" if settings.get("limit") else ""
        value = "—" if accuracy is None else f"{100 * accuracy:.2f}"
        return f"{entry.get('task')} accuracy{few_shot}{limit} (lm-eval)", value
    return None


def card_rows(results_path: Path, identity: dict) -> list[tuple[str, str]]:
    """(what was measured, value) of every entry recorded for `identity` in a results.json, sorted; [] if none."""
    if not Path(results_path).exists():
        return []
    try:
        entries = json.loads(Path(results_path).read_text()).get("entries", {}).values()
    except ValueError:
        return []  # kbvq eval reports a broken results file itself; the card just lacks results
    rows = [_label(entry) for entry in entries if entry.get("model") == identity]
    return sorted(row for row in rows if row is not None)


def run_card_rows(run_dir: Path, stage_dir) -> list[tuple[str, str]]:
    """The card rows of the pack `stage_dir` from the run's `eval/results.json`."""
    return card_rows(Path(run_dir) / RESULTS, packed_identity(stage_dir))
