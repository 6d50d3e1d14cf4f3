"""Recipes: a model, a run directory and every stage's settings, in YAML.

    model: ./testbed            # a local directory or a Hugging Face id
    run: runs/testbed-w2        # optional; default runs/<model name>
    method: kbvq                # kbvq (default), gptq (RTN/GPTQ baselines) or fp16: which stages run
    calibration: runs/testbed/calibration   # optional: share this run's calibrate stage (one per model)
    preset: kbvq-w2             # optional: start from a preset's method and settings (kbvq_cli/presets.py)
    calibrate: {samples: 128, seqlen: 256}
    vq: {bits: 2}

Settings are resolved in layers: the stage's defaults (the paper's), the run's saved
`RUN/recipe.yaml`, the `--recipe` file, then command-line options. The resolved recipe is saved back
into the run, so later stages (and `kbvq run`) see what earlier ones used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kbvq_cli.errors import KbvqError
from kbvq_cli.registry import METHODS, STAGES
from kbvq_cli.settings import parse_settings, settings_dict

RECIPE_FILE = "recipe.yaml"
TOP_LEVEL_KEYS = ("model", "run", "method", "calibration", "description", "preset")


@dataclass
class Recipe:
    model: str | None = None
    run: str | None = None
    description: str = ""
    stages: dict[str, dict] = field(default_factory=dict)
    method: str | None = None  # None: kbvq
    calibration: str | None = None

    def to_yaml_data(self) -> dict:
        data: dict[str, Any] = {"model": self.model}
        if self.run:
            data["run"] = self.run
        if self.method:
            data["method"] = self.method
        if self.calibration:
            data["calibration"] = self.calibration
        if self.description:
            data["description"] = self.description
        data.update({name: self.stages[name] for name in STAGES if name in self.stages})
        return data


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise KbvqError(f"cannot read recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise KbvqError(f"recipe {path} is not valid YAML{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KbvqError(f"recipe {path} must be a mapping of model, run and stage settings")
    return data


def load_recipe(path: Path) -> Recipe:
    data = _read_yaml(path)
    allowed = TOP_LEVEL_KEYS + tuple(STAGES)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise KbvqError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    stages = {}
    for name in STAGES:
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise KbvqError(f"recipe {path}: '{name}' must be a mapping of settings")
        stages[name] = value
    model = data.get("model")
    method = data.get("method")
    if data.get("preset") is not None:  # the preset's settings, the file's laid over them
        from kbvq_cli.presets import get_preset, merge_stages

        try:
            preset = get_preset(str(data["preset"]))
        except KbvqError as error:
            raise KbvqError(f"recipe {path}: {error}") from None
        stages, method = merge_stages(preset.stage_settings(), stages), method or preset.method
    if method is not None and method not in METHODS:
        raise KbvqError(f"recipe {path}: method {method!r} is unknown; use one of {', '.join(METHODS)}")
    return Recipe(
        model=str(model) if model is not None else None,
        run=str(data["run"]) if data.get("run") else None,
        description=str(data.get("description") or ""),
        stages={name: value for name, value in stages.items() if value},
        method=method,
        calibration=str(data["calibration"]) if data.get("calibration") else None,
    )


def validate_recipe(recipe: Recipe, where: str) -> dict[str, Any]:
    """Parse every stage's settings (the `--dry-run` check); returns the resolved settings objects."""
    return {
        name: parse_settings(STAGES[name].settings_class(), recipe.stages.get(name), f"{where}: {name}")
        for name in STAGES
    }


def model_short_name(model: str) -> str:
    return Path(model.rstrip("/")).name or "model"


@dataclass
class ResolvedStage:
    run_dir: Path
    model: str | None
    settings: Any
    recipe: Recipe
    # How this invocation may run, not what it makes: never hashed, never saved in the recipe.
    allow_thread_change: bool = False


def resolve_stage(
    stage: str,
    *,
    run: str | None,
    recipe_path: str | None,
    model: str | None,
    overrides: dict[str, Any],
    allow_thread_change: bool = False,
    recipe: Recipe | None = None,
) -> ResolvedStage:
    """Apply the layers of settings for one stage and save the merged recipe into the run. `recipe`, a
    recipe built in memory (`kbvq run --preset`), takes the place of a `recipe_path` file."""
    file_recipe = recipe if recipe is not None else load_recipe(Path(recipe_path)) if recipe_path else Recipe()
    model = model or file_recipe.model
    run_text = run or file_recipe.run
    if run_text is None:
        if model is None:
            raise KbvqError(f"`kbvq {stage}` needs --run DIR (or --model / --recipe to name a new run)")
        run_text = str(Path("runs") / model_short_name(model))
    run_dir = Path(run_text)
    saved = load_recipe(run_dir / RECIPE_FILE) if (run_dir / RECIPE_FILE).exists() else Recipe()
    model = model or saved.model
    merged = {**saved.stages.get(stage, {}), **file_recipe.stages.get(stage, {})}
    merged.update({key: value for key, value in overrides.items() if value is not None})
    settings = parse_settings(STAGES[stage].settings_class(), merged, f"{stage} settings")
    stages = {**saved.stages, **{k: v for k, v in file_recipe.stages.items() if v}}
    stages[stage] = settings_dict(settings)
    recipe = Recipe(model=model, run=str(run_dir), description=file_recipe.description or saved.description,
                    stages=stages, method=file_recipe.method or saved.method,
                    calibration=file_recipe.calibration or saved.calibration)
    return ResolvedStage(run_dir=run_dir, model=model, settings=settings, recipe=recipe,
                         allow_thread_change=allow_thread_change)


def save_run_recipe(resolved: ResolvedStage) -> None:
    """Save the merged recipe into the run, only if that changes the file: a finished run on a
    read-only disk is then still verified, skipped and evaluated (and an unchanged file keeps its mtime)."""
    import yaml

    from kbvq_cli.atomic import atomic_write_text

    path = resolved.run_dir / RECIPE_FILE
    text = yaml.safe_dump(resolved.recipe.to_yaml_data(), sort_keys=False)
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass  # absent or unreadable: write it
    atomic_write_text(path, text)
