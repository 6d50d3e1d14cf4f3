"""The lifecycle every stage shares, written once: open, verify, skip if complete, commit, finish, summarise.

    stage = StageRun.open(resolved, "vq", restart, model=source.fingerprint())
    if stage.complete:
        return stage.skip()
    ... stage.dir.write_unit(...) per unit ...
    return stage.finish(summary, "vq: 12 layers in 3.4 s ...")

`open` hashes the stage's settings (all but where-it-runs keys such as the device) and its inputs: the
manifests of the upstream stages the registry declares for it (`kbvq_cli.registry`) plus what the stage
names (model fingerprint, data). A stage keeps no list of its own upstream stages.

`open` checks everything before it writes anything, so a refused command leaves the run as it was:
the lineage (`kbvq_cli.lineage`: the upstream stages were made from the model this command reads),
then the stage's own recorded settings and inputs; only then is the stage directory written and the
merged recipe saved into `RUN/recipe.yaml`. Partial work is resumed only on the torch thread count it
was begun with (`kbvq_cli.threads`), unless the command passes `--allow-thread-change`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from kbvq_cli.console import info
from kbvq_cli.errors import KbvqError
from kbvq_cli.lineage import check_lineage
from kbvq_cli.recipe import ResolvedStage, save_run_recipe
from kbvq_cli.registry import upstream_of
from kbvq_cli.settings import settings_dict
from kbvq_cli.threads import check_thread_count, thread_record
from kbvq_cli.stage_dir import MANIFEST, StageDir, read_manifest


@dataclass
class StageRun:
    """One stage's open directory and its bookkeeping for one invocation."""

    name: str
    dir: StageDir
    upstream: dict[str, StageDir]
    started: float = field(default_factory=time.time)

    @classmethod
    def open(cls, resolved: ResolvedStage, name: str, restart: bool, **inputs) -> "StageRun":
        """Open (create, or reopen to resume) `RUN/<name>`. `inputs` are hashed beside the upstream manifests."""
        upstream = upstream_dirs(resolved, name)
        recorded = {"upstream": {stage: d.manifest_hash() for stage, d in upstream.items()}} if upstream else {}
        inputs = {**recorded, **inputs}
        labels = {"model": resolved.model} if "model" in inputs else {}
        # `--restart` redoes this stage on the same lineage; it never re-points the run at another model.
        check_lineage(resolved.run_dir, inputs, labels, upstream)
        config = hashed_settings(resolved.settings)
        if not restart:
            config = config_as_recorded(resolved.run_dir / name, config, resolved.settings)
        threads = thread_record()
        stage_dir = StageDir.prepare_write(resolved.run_dir, name, config, inputs, restart=restart, labels=labels,
                                           runtime=threads)
        check_thread_count(stage_dir, threads, resolved.allow_thread_change)
        stage_dir.begin_write()  # every check has passed: the first write
        if not stage_dir.complete:  # a complete, verified stage is only read: nothing of the run is written
            stage_dir.manifest["runtime"] = threads  # committed with the stage's next commit
            save_run_recipe(resolved)
        return cls(name, stage_dir, upstream)

    @property
    def complete(self) -> bool:
        return self.dir.complete

    @property
    def seconds(self) -> float:
        return time.time() - self.started

    def skip(self) -> dict:
        """A complete stage is verified (on open) and skipped: its recorded summary."""
        info(f"{self.name}: already complete in {self.dir.path}")
        return self.dir.manifest["summary"]

    def finish(self, summary: dict, message: str | None = None) -> dict:
        """Mark the stage complete with its summary (the commit point), and say what it did."""
        self.dir.finish(summary)
        if message:
            info(message)
        return summary


def upstream_dirs(resolved: ResolvedStage, name: str) -> dict[str, StageDir]:
    """The finished upstream stages the registry declares for `name` under the run's method. An optional
    upstream counts only when it ran and produced units (e.g. `nonexpert` with method none does not)."""
    required, optional = upstream_of(name, resolved.recipe.method or "kbvq")
    found = {stage: StageDir.open_finished(resolved.run_dir, stage) for stage in required}
    for stage in optional:
        if (resolved.run_dir / stage / MANIFEST).exists():
            stage_dir = StageDir.open_finished(resolved.run_dir, stage)
            if stage_dir.unit_names():
                found[stage] = stage_dir
    return found


def hashed_settings(settings) -> dict:
    """The settings that define the result: all of them except where-it-runs keys (e.g. device)."""
    runtime = getattr(settings, "RUNTIME_KEYS", ())
    return {key: value for key, value in settings_dict(settings).items() if key not in runtime}


def config_as_recorded(path, config: dict, settings) -> dict:
    """A run made before a setting existed stays valid while that setting keeps its default: the config
    is compared (and hashed) without such keys, so upgrading kbvq does not invalidate finished work."""
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


def require_model(resolved: ResolvedStage) -> str:
    if resolved.model is None:
        raise KbvqError(f"no model recorded in {resolved.run_dir}/recipe.yaml; run `kbvq calibrate --model ...` first")
    return resolved.model
