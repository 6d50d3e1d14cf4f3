"""`kbvq run`: the stages of a recipe's method in order; finished stages are verified and skipped.

A recipe naming `calibration: DIR` shares that run's calibrate stage (the expensive pass, one per
model): calibrate runs (or resumes, or is found finished) in DIR, and `RUN/calibrate` is a symbolic
link to it, so every later stage and command reads it as its own.

Under torchrun every rank runs the recipe: each distributed stage in turn, and eval on rank 0 alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from kbvq_cli.console import console, heading
from kbvq_cli.errors import KbvqError
from kbvq_cli.recipe import load_recipe, model_short_name, resolve_stage, validate_recipe
from kbvq_cli.registry import STAGES, pipeline_stages
from kbvq_cli.run_lock import run_lock
from kbvq_cli.settings import settings_dict


# Stages that do not run under torchrun: `kbvq run` runs them on rank 0 alone (eval writes one results
# file and scores one model).
SINGLE_PROCESS = ("eval",)


def run_dir_of(recipe, run: str | None) -> str:
    return run or recipe.run or str(Path("runs") / model_short_name(recipe.model))


def run_recipe(recipe_path: str, run: str | None, *, dry_run: bool = False, allow_thread_change: bool = False) -> Path:
    recipe = load_recipe(Path(recipe_path))
    resolved = validate_recipe(recipe, f"recipe {recipe_path}")
    if recipe.model is None:
        raise KbvqError(f"recipe {recipe_path} names no model; add `model: ID_OR_DIR`")
    run_dir = run_dir_of(recipe, run)
    stages = pipeline_stages(recipe.method or "kbvq")
    if dry_run:
        console.print(f"recipe {recipe_path} is valid: model {recipe.model}, method {recipe.method or 'kbvq'}, "
                      f"run {run_dir}" + (f", calibration from {recipe.calibration}" if recipe.calibration else ""))
        for name in stages:
            settings = ", ".join(f"{k}={v}" for k, v in settings_dict(resolved[name]).items())
            console.print(f"  {name}: {settings}")
        return Path(run_dir)
    with run_lock(Path(run_dir)):  # the stages below are one writer; each takes the same lock again
        for name in stages:
            heading(f"== {name}")
            if name == "calibrate" and recipe.calibration:
                run_shared_calibration(recipe_path, recipe.calibration, Path(run_dir), allow_thread_change)
                continue
            stage = resolve_stage(name, run=run_dir, recipe_path=recipe_path, model=None, overrides={},
                                  allow_thread_change=allow_thread_change)
            if name in SINGLE_PROCESS:
                run_on_rank_zero(lambda: STAGES[name].runner_function()(stage, restart=False))
                continue
            STAGES[name].runner_function()(stage, restart=False)
    return Path(run_dir)


def run_on_rank_zero(step) -> None:
    """Under torchrun, `step` on rank 0 while the other ranks wait (a stage that is not distributed)."""
    from kbvq_cli import distributed

    if distributed.world().leader:
        try:
            step()
        except Exception as error:
            distributed.sync(error)
    distributed.sync()


def run_shared_calibration(recipe_path: str, calibration: str, run_dir: Path, allow_thread_change: bool = False
                           ) -> None:
    """Calibrate (or resume, or verify) in the shared directory, and link RUN/calibrate to it."""
    stage = resolve_stage("calibrate", run=calibration, recipe_path=recipe_path, model=None, overrides={},
                          allow_thread_change=allow_thread_change)
    with run_lock(Path(calibration)):  # the shared directory is another run's too: one writer at a time
        STAGES["calibrate"].runner_function()(stage, restart=False)
    from kbvq_cli import distributed

    target = (Path(calibration) / "calibrate").resolve()
    link = run_dir / "calibrate"
    if not distributed.world().leader:
        distributed.sync()  # rank 0 makes the link; the next stage reads through it
        return
    try:
        _link_calibration(link, target, run_dir)
    except Exception as error:
        distributed.sync(error)
    distributed.sync()


def _link_calibration(link: Path, target: Path, run_dir: Path) -> None:
    if link.is_symlink() and link.resolve() == target:
        return
    if link.exists() or link.is_symlink():
        raise KbvqError(f"{link} exists and is not a link to the shared calibration {target}; "
                        f"remove it or use another --run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=True)
