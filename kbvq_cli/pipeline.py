"""`kbvq run`: every stage of a recipe in order; finished stages are verified and skipped."""

from __future__ import annotations

from pathlib import Path

from kbvq_cli.console import console, info
from kbvq_cli.errors import KbvqError
from kbvq_cli.recipe import load_recipe, model_short_name, resolve_stage, validate_recipe
from kbvq_cli.registry import STAGE_ORDER, STAGES
from kbvq_cli.settings import settings_dict


def run_recipe(recipe_path: str, run: str | None, *, dry_run: bool = False) -> None:
    recipe = load_recipe(Path(recipe_path))
    resolved = validate_recipe(recipe, f"recipe {recipe_path}")
    if recipe.model is None:
        raise KbvqError(f"recipe {recipe_path} names no model; add `model: ID_OR_DIR`")
    run_dir = run or recipe.run or str(Path("runs") / model_short_name(recipe.model))
    if dry_run:
        console.print(f"recipe {recipe_path} is valid: model {recipe.model}, run {run_dir}")
        for name in STAGE_ORDER:
            settings = ", ".join(f"{k}={v}" for k, v in settings_dict(resolved[name]).items())
            console.print(f"  {name}: {settings}")
        return
    for name in STAGE_ORDER:
        info(f"[bold]== {name}[/bold]")
        stage = resolve_stage(name, run=run_dir, recipe_path=recipe_path, model=None, overrides={})
        STAGES[name].runner_function()(stage, restart=False)
