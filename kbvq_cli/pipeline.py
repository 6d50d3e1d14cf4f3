"""`kbvq run`: the stages of a recipe's method in order; finished stages are verified and skipped.

The recipe is a file (`--recipe`) or a preset (`--preset NAME --model M`, kbvq_cli/presets.py) built in
memory; either way every stage resolves its settings from it exactly as from a file.

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
from kbvq_cli.recipe import Recipe, load_recipe, model_short_name, resolve_stage, validate_recipe
from kbvq_cli.registry import STAGES, pipeline_stages
from kbvq_cli.run_lock import run_lock
from kbvq_cli.settings import settings_dict


# Stages that do not run under torchrun: `kbvq run` runs them on rank 0 alone (eval writes one results
# file and scores one model).
SINGLE_PROCESS = ("eval",)


def run_dir_of(recipe, run: str | None) -> str:
    return run or recipe.run or str(Path("runs") / model_short_name(recipe.model))


def run_command(recipe_path: str | None, preset: str | None, model: str | None, run: str | None,
                options: dict, *, dry_run: bool = False, allow_thread_change: bool = False) -> Path:
    """`kbvq run`: a recipe file, or a preset on `model` with the calibration/evaluation `options`
    (data, samples, seqlen, ppl_data, tasks; seqlen is both the calibration length and the window)."""
    if preset is None:
        given = [f"--{k.replace('_', '-')}" for k, v in {**options, "model": model}.items() if v is not None]
        if recipe_path is None or given:
            raise KbvqError("`kbvq run` needs --recipe FILE, or --preset NAME --model M (" +
                            (", ".join(given) or "--model, --data, --samples, --seqlen, --ppl-data, --tasks") +
                            " go with --preset)")
        return run_recipe(recipe_path, run, dry_run=dry_run, allow_thread_change=allow_thread_change)
    from kbvq_cli.presets import preset_recipe

    if recipe_path is not None or model is None:
        raise KbvqError("--preset NAME needs --model M and no --recipe (a recipe file can say `preset: NAME`)")
    calibrate = {key: options.get(key) for key in ("data", "samples", "seqlen")}
    evaluate = {key: options.get(key) for key in ("ppl_data", "seqlen", "tasks")}
    built = preset_recipe(preset, model, run, calibrate, evaluate, target_bits=options.get("target_bits"))
    return run_recipe(None, built.run, recipe=built, where=f"preset {preset}", dry_run=dry_run,
                      allow_thread_change=allow_thread_change)


def run_recipe(recipe_path: str | None, run: str | None, *, dry_run: bool = False, allow_thread_change: bool = False,
               recipe: Recipe | None = None, where: str | None = None) -> Path:
    """Run (or with `dry_run` validate and print) the recipe file `recipe_path`, or the in-memory `recipe`
    (`where` names it in messages)."""
    where = where or f"recipe {recipe_path}"
    recipe = load_recipe(Path(recipe_path)) if recipe is None else recipe
    resolved = validate_recipe(recipe, where)
    if recipe.model is None:
        raise KbvqError(f"{where} names no model; add `model: ID_OR_DIR`")
    run_dir = run_dir_of(recipe, run)
    stages = pipeline_stages(recipe.method or "kbvq")
    if dry_run:
        console.print(f"{where} is valid: model {recipe.model}, method {recipe.method or 'kbvq'}, "
                      f"run {run_dir}" + (f", calibration from {recipe.calibration}" if recipe.calibration else ""))
        for name in stages:
            settings = ", ".join(f"{k}={v}" for k, v in settings_dict(resolved[name]).items())
            console.print(f"  {name}: {settings}")
        return Path(run_dir)
    with run_lock(Path(run_dir)):  # the stages below are one writer; each takes the same lock again
        for name in stages:
            heading(f"== {name}")
            if name == "calibrate" and recipe.calibration:
                run_shared_calibration(recipe, recipe.calibration, Path(run_dir), allow_thread_change)
                continue
            stage = resolve_stage(name, run=run_dir, recipe_path=None, recipe=recipe, model=None, overrides={},
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


def run_shared_calibration(recipe: Recipe, calibration: str, run_dir: Path, allow_thread_change: bool = False
                           ) -> None:
    """Calibrate (or resume, or verify) in the shared directory, and link RUN/calibrate to it."""
    stage = resolve_stage("calibrate", run=calibration, recipe_path=None, recipe=recipe, model=None, overrides={},
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
