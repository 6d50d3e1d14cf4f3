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

Under torchrun (`kbvq_cli.distributed`) rank 0 alone opens, checks and verifies, and commits what it
found; the other ranks wait for it and then read that manifest. A unit-sharded stage then takes its
share of the units with `stage.mine(...)`, which makes every rank commit to its own journal
(`kbvq_cli.stage_dir`), and calls `stage.gather()` before its summary: after it every rank sees every
unit, and rank 0 alone writes the manifest again. Without torchrun both are no-ops.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from kbvq_cli import distributed
from kbvq_cli.console import info, set_others_progress
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
    foreign_done: int = 0  # units other ranks own that were finished before this invocation (progress)

    @classmethod
    def open(cls, resolved: ResolvedStage, name: str, restart: bool, **inputs) -> "StageRun":
        """Open (create, or reopen to resume) `RUN/<name>`. `inputs` are hashed beside the upstream manifests."""
        here = distributed.world()
        if not here.distributed:
            return cls._open(resolved, name, restart, **inputs)
        distributed.ensure_group(_device_type(resolved.settings))
        if here.leader:
            try:
                stage = cls._open(resolved, name, restart, **inputs)
                if not stage.complete:
                    stage.dir.commit_aux({})  # what verification dropped and resume merged, for the others to read
            except Exception as error:  # the others wait for this sync point: tell them, then fail alike
                distributed.sync(error)
            distributed.sync()
        else:
            distributed.sync()  # rank 0 has checked, verified and committed
            stage_dir = StageDir(resolved.run_dir / name, read_manifest(resolved.run_dir / name))
            stage_dir.follower = True
            stage = cls(name, stage_dir, upstream_dirs(resolved, name))
        if not stage.complete:  # rank 0's bars count every rank's units; every rank leaves a bar together
            set_others_progress(stage._others_done if here.leader else lambda: 0)
        return stage

    @classmethod
    def _open(cls, resolved: ResolvedStage, name: str, restart: bool, **inputs) -> "StageRun":
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
        set_others_progress(None)
        info(f"{self.name}: already complete in {self.dir.path}")
        return self.dir.manifest["summary"]

    def finish(self, summary: dict, message: str | None = None) -> dict:
        """Mark the stage complete with its summary (the commit point), and say what it did."""
        self.gather()
        self.dir.finish(summary)  # rank 0's commit; the other ranks wait for it
        distributed.sync()
        set_others_progress(None)
        if message:
            info(message)
        return summary

    # ---------------------------------------------------------------- torchrun
    def mine(self, items: list, name, cost=None) -> list:
        """This rank's share of `items` (unit-sharded stages; `name(item)` is the item's unit name, `cost`
        its work estimate): all of them without torchrun. From the first call each rank commits to its own
        journal."""
        here = distributed.world()
        if not here.distributed:
            return list(items)
        if self.dir.journal is None:
            self.dir.follower = False
            self.dir.journal_to(here.rank)
        chosen = distributed.mine(items, name, cost)
        picked = {name(item) for item in chosen}
        self.foreign_done += sum(1 for item in items if name(item) not in picked and self.dir.has_unit(name(item)))
        return chosen

    def gather(self) -> None:
        """The sync point before a stage's summary: rank 0 merges every rank's journal into the manifest
        (a unit-sharded stage), and every other rank reads the manifest back, so all see every unit.
        A no-op without torchrun."""
        here = distributed.world()
        if not here.distributed:
            return
        # a collective: when it returns every rank has committed its last unit
        journalled = any(distributed.all_gather_object(self.dir.journal is not None))
        if journalled and here.leader:
            self.dir.merge_journals()
        distributed.sync()
        if not here.leader:
            self.dir.manifest = read_manifest(self.dir.path)
            self.dir.journal, self.dir.follower = None, True

    def _others_done(self) -> int:
        """Units the other ranks have finished (for rank 0's progress of the whole job)."""
        import json

        count = self.foreign_done
        own = self.dir.journal
        for journal in self.dir.path.glob("journal-rank-*.json"):
            if journal == own:
                continue
            try:
                count += len(json.loads(journal.read_text()).get("units", {}))
            except (OSError, ValueError):
                pass
        return count


def _device_type(settings) -> str:
    """What the stage computes on, for the process group: NCCL joins gloo only for a CUDA stage."""
    from kbvq_cli.streaming import pick_device

    return pick_device(getattr(settings, "device", None) or "cpu")


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
