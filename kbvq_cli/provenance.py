"""What a stage was made from, in words: its settings, its model, its upstream stages, its data.

Manifests record inputs as hashes (the model fingerprint, the upstream manifests' hashes), which is
what makes a comparison exact; a refusal that printed them would leave the user to work out from
sha256 prefixes that they named another model. These functions turn two manifests into phrases such
as "samples: 4 -> 5", "calibrate has been redone since" or "tiny/qwen (qwen2_moe)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# How a refusal names the stage every lineage starts from (the registry's only stage with no upstream).
ROOT_STAGE = "calibrate"


def _show(value: Any) -> str:
    text = str(value)
    return text[:40] + "…" if len(text) > 40 else text


def value_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'path: old -> new' wherever two JSON-like values differ ('path added' / 'path removed' for keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                changes.append(f"{path} added")
            elif key not in new:
                changes.append(f"{path} removed")
            else:
                changes.extend(value_changes(old[key], new[key], path))
        return changes
    return [f"{prefix or 'value'}: {_show(old)} -> {_show(new)}"] if old != new else []


def describe_model(fingerprint: dict | None, label: str | None) -> str:
    """'tiny/qwen (qwen2_moe)': the model as the user named it, and its architecture."""
    kind = (fingerprint or {}).get("model_type", "unknown architecture")
    return f"{label} ({kind})" if label else f"a {kind} model"


def model_sides(recorded: dict, recorded_label: str | None, named: dict, named_label: str | None) -> tuple[str, str]:
    """The two models of a mismatch in words. When both read the same (one directory whose files
    changed in place), the named side says which files differ, so the message still shows a difference."""
    before, after = describe_model(recorded, recorded_label), describe_model(named, named_label)
    if before == after:
        old, new = recorded.get("files", {}), named.get("files", {})
        files = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        after += f", whose files differ ({', '.join(files[:3])}{', …' if len(files) > 3 else ''})"
    return before, after


def _upstream_changes(old: dict, new: dict) -> list[str]:
    phrases = []
    for stage in sorted(set(old) | set(new)):
        if stage not in old:
            phrases.append(f"{stage} has run since")
        elif stage not in new:
            phrases.append(f"{stage} no longer counts")
        elif old[stage] != new[stage]:
            phrases.append(f"{stage} has been redone since")
    return phrases


def _data_changes(old: dict, new: dict) -> list[str]:
    old_files, new_files = old.get("local"), new.get("local")
    if old_files is not None and new_files is not None and set(old_files) == set(new_files):
        changed = sorted(name for name in old_files if old_files[name] != new_files[name])
        return [f"the contents of the calibration data changed ({', '.join(Path(n).name for n in changed[:3])})"]
    return [f"calibration data: {_show(_data_name(old))} -> {_show(_data_name(new))}"]


def _data_name(fingerprint: dict) -> str:
    if "local" in fingerprint:
        return ", ".join(sorted(fingerprint["local"]))
    hub = fingerprint.get("hub", {})
    return ":".join(str(part) for part in (hub.get("dataset"), hub.get("config")) if part) or "?"


def input_changes(old: dict, new: dict, settings_changed: bool = False) -> list[str]:
    """Phrases for the inputs (other than the model) that differ between two manifests. Other tokens
    follow from other sampling settings, so they are named only when the settings are the same."""
    phrases = []
    for key in sorted(set(old) | set(new)):
        if key == "model" or old.get(key) == new.get(key) or (key == "tokens_sha256" and settings_changed):
            continue
        if key == "upstream":
            phrases += _upstream_changes(old.get(key) or {}, new.get(key) or {})
        elif key == "data" and key in old and key in new:
            phrases += _data_changes(old[key], new[key])
        elif key == "tokens_sha256":
            phrases.append("the calibration tokens differ (another tokenizer or sampling)")
        else:
            phrases += value_changes(old.get(key), new.get(key), key)
    return phrases


def changed_refusal(stage: str, path: Path, existing: dict, fresh: dict) -> str:
    """The message refusing to reopen `path` (stage `stage`) whose manifest `existing` differs from `fresh`.

    A changed model leads, naming both; for the stage every lineage starts from it suggests another
    run directory rather than `--restart`, which would throw away the (expensive) calibration.
    """
    run_dir = Path(path).parent
    old_inputs, new_inputs = existing.get("inputs", {}), fresh["inputs"]
    settings = value_changes(existing.get("config", {}), fresh["config"])
    others = settings + input_changes(old_inputs, new_inputs, settings_changed=bool(settings))
    listed = "; ".join(others[:4]) + ("; …" if len(others) > 4 else "")
    if "model" in old_inputs and "model" in new_inputs and old_inputs["model"] != new_inputs["model"]:
        before, after = model_sides(old_inputs["model"], existing.get("labels", {}).get("model"),
                                    new_inputs["model"], fresh.get("labels", {}).get("model"))
        also = f" (also: {listed})" if others else ""
        if stage == ROOT_STAGE:
            return f"{run_dir} was calibrated on {before}; this command names {after}{also}; use another --run"
        return (f"{stage} in {run_dir} was made from {before}; this command names {after}{also}; "
                f"pass --restart to redo {stage}, or use another --run")
    return (f"{stage} in {path} was made with other settings ({listed}); "
            f"pass --restart to redo it, or use another --run directory")
