"""What every stage does when it starts: hash its settings, save the run's recipe, open its directory."""

from __future__ import annotations

from kbvq_cli.errors import KbvqError
from kbvq_cli.recipe import ResolvedStage, save_run_recipe
from kbvq_cli.settings import settings_dict
from kbvq_cli.stage_dir import StageDir


def hashed_settings(settings) -> dict:
    """The settings that define the result: all of them except where-it-runs keys (e.g. device)."""
    runtime = getattr(settings, "RUNTIME_KEYS", ())
    return {key: value for key, value in settings_dict(settings).items() if key not in runtime}


def open_stage(resolved: ResolvedStage, stage: str, config: dict, inputs: dict, restart: bool) -> StageDir:
    save_run_recipe(resolved)
    if not restart:
        config = config_as_recorded(resolved.run_dir / stage, config, resolved.settings)
    return StageDir.open_for_write(resolved.run_dir, stage, config, inputs, restart=restart)


def config_as_recorded(path, config: dict, settings) -> dict:
    """A run made before a setting existed stays valid while that setting keeps its default: the config
    is compared (and hashed) without such keys, so upgrading kbvq does not invalidate finished work."""
    import dataclasses

    from kbvq_cli.stage_dir import MANIFEST, read_manifest

    if not (path / MANIFEST).exists():
        return config
    recorded = read_manifest(path).get("config", {})  # an unreadable manifest is reported here, as on open
    defaults = {field.name: field.default for field in dataclasses.fields(settings)}
    added = set(config) - set(recorded)
    if not added or not set(recorded) <= set(config):
        return config
    if all(config[key] == defaults.get(key) for key in added):
        return {key: config[key] for key in recorded}
    return config


def upstream_inputs(stage_dirs: dict[str, StageDir]) -> dict:
    """Identity of the upstream stages a stage reads: their manifest hashes."""
    return {name: stage_dir.manifest_hash() for name, stage_dir in stage_dirs.items()}


def require_model(resolved: ResolvedStage) -> str:
    if resolved.model is None:
        raise KbvqError(f"no model recorded in {resolved.run_dir}/recipe.yaml; run `kbvq calibrate --model ...` first")
    return resolved.model
