"""A stage's directory: safetensors shards plus `manifest.json`, the commit point of every write.

Protocol (shard first, manifest last):
1. a unit's shard is written atomically and its sha256 taken from the file on disk;
2. the manifest, listing every finished unit with its hash, is rewritten atomically.
A killed run therefore loses at most the shard in flight; anything not in the manifest does not exist.

Under torchrun (`kbvq_cli.distributed`) every rank writes its own units, and a manifest rewritten by
several processes would lose commits, so each rank commits to its own journal instead
(`journal-rank-RRR.json`: the units, aux files and state it committed, atomically rewritten after each
shard) and rank 0 alone merges the journals into the manifest: at the stage's sync point, and on any
resume, whatever world size the rerun has. A killed rank still loses at most the shard in flight.

The manifest also records the hash of the whole resolved stage config and of the stage's inputs
(model files, data selection, upstream manifests). Reopening a directory whose config or inputs
differ is refused, naming what changed, unless the caller asks for a restart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from kbvq_cli import __version__
from kbvq_cli.atomic import atomic_write, atomic_write_json, remove_stale_temps
from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import canonical_json, hash_json, sha256_file
from kbvq_cli.provenance import changed_refusal

MANIFEST = "manifest.json"
JOURNALS = "journal-rank-*.json"


@dataclass(frozen=True)
class FileRecord:
    file: str
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


class StageDir:
    """One stage's output directory. Create with `open_for_write` or `open_finished`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._pending: str | None = None  # what `begin_write` has still to write
        self.journal: Path | None = None  # where this rank commits under torchrun (`journal_to`)
        self._journal_base: set[str] = set()  # units the manifest held when journalling began
        self.follower = False  # a rank other than 0 after the sync point: it commits nothing
        self._merged: list[Path] = []  # journals folded into the manifest on open, deleted once it is committed

    # ---------------------------------------------------------------- opening
    @classmethod
    def open_for_write(
        cls, run_dir: Path, stage: str, config: dict, inputs: dict, *, restart: bool = False,
        labels: dict | None = None, runtime: dict | None = None,
    ) -> "StageDir":
        """Create the stage directory, or reopen it to resume after checking config and inputs.

        Every finished file is hashed on resume; one that fails is dropped and redone, and reported.
        `labels` name the inputs for messages (the model as the user gave it) and `runtime` says where
        the stage ran (its thread count); neither is hashed.
        """
        return cls.prepare_write(run_dir, stage, config, inputs, restart=restart, labels=labels,
                                 runtime=runtime).begin_write()

    @classmethod
    def prepare_write(
        cls, run_dir: Path, stage: str, config: dict, inputs: dict, *, restart: bool = False,
        labels: dict | None = None, runtime: dict | None = None,
    ) -> "StageDir":
        """`open_for_write`'s reading and checking, writing nothing, so a caller can add its own checks
        before `begin_write` makes the first write: a refused command leaves the directory as it was."""
        path = Path(run_dir) / stage
        fresh = {
            "stage": stage,
            "tool_version": __version__,
            "config": config,
            "config_hash": hash_json(config),
            "inputs": inputs,
            "inputs_hash": hash_json(inputs),
            "labels": labels or {},
            "runtime": runtime or {},
            "units": {},
            "aux": {},
            "state": {},
            "complete": False,
            "summary": {},
        }
        if restart or not (path / MANIFEST).exists():  # a restart discards the old manifest unread
            stage_dir = cls(path, fresh)
            stage_dir._pending = "restart" if restart else "create"
            return stage_dir
        existing = read_manifest(path)
        cls._refuse_if_changed(path, stage, existing, fresh)
        stage_dir = cls(path, existing)
        stage_dir._merged = merge_journals(path, existing)  # a distributed run's commits, before verifying them
        stage_dir._verify_own_files()
        # A complete, verified stage is only read: it may sit on a read-only disk.
        stage_dir._pending = None if stage_dir.complete else "resume"
        return stage_dir

    def begin_write(self) -> "StageDir":
        """Make the writes `prepare_write` planned: discard a restarted stage, create the directory and its
        first manifest, or tidy a resumed one (stale temp files, uncommitted shards)."""
        pending, self._pending = self._pending, None
        if pending == "restart" and self.path.exists():
            shutil.rmtree(self.path)
        if pending in ("restart", "create"):
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.path)
            for journal in self.path.glob(JOURNALS):  # of a manifest that is gone: nothing to merge into
                journal.unlink(missing_ok=True)
            self._commit()
        elif pending == "resume":
            remove_stale_temps(self.path)
            self._remove_orphans()
            if self._merged:
                self._commit()  # the merged units are committed in the manifest: their journals can go
                self._drop_journals(self._merged)
        return self

    @staticmethod
    def _refuse_if_changed(path: Path, stage: str, existing: dict, fresh: dict) -> None:
        if existing.get("config_hash") != fresh["config_hash"] or existing.get("inputs_hash") != fresh["inputs_hash"]:
            raise KbvqError(changed_refusal(stage, path, existing, fresh))

    @classmethod
    def open_finished(cls, run_dir: Path, stage: str) -> "StageDir":
        """Open an upstream stage for reading: it must exist, be complete, and its files intact."""
        path = Path(run_dir) / stage
        if not (path / MANIFEST).exists():
            raise KbvqError(f"stage {stage} has not been run in {run_dir}; run `kbvq {stage} --run {run_dir}` first")
        manifest = read_manifest(path)
        if not manifest.get("complete"):
            raise KbvqError(
                f"stage {stage} in {run_dir} is unfinished; rerun `kbvq {stage} --run {run_dir}` to complete it"
            )
        stage_dir = cls(path, manifest)
        for name, record in {**manifest["units"], **manifest["aux"]}.items():
            file = path / record["file"]
            if not file.exists() or file.stat().st_size != record["bytes"]:
                raise KbvqError(
                    f"{stage} shard {record['file']} in {run_dir} is missing or truncated; "
                    f"rerun `kbvq {stage} --run {run_dir}` to redo it"
                )
        return stage_dir

    # ---------------------------------------------------------------- queries
    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def has_work(self) -> bool:
        """Whether anything of this stage has been committed (a unit, or an aux file such as a checkpoint)."""
        return bool(self.manifest["units"] or self.manifest["aux"])

    def has_unit(self, name: str) -> bool:
        return name in self.manifest["units"]

    def unit_names(self) -> list[str]:
        return sorted(self.manifest["units"])

    def manifest_hash(self) -> str:
        """What a downstream stage records as this stage's identity."""
        return hash_json({k: self.manifest[k] for k in ("stage", "config_hash", "inputs_hash", "units", "aux")})

    # ---------------------------------------------------------------- writing
    def write_unit(self, name: str, tensors: dict, metadata: dict | None = None, *, aux=None, state=None) -> None:
        """Write one finished unit (shard) and commit it; optionally commit aux files/state with it."""
        record = self._write_shard(f"{name}.safetensors", tensors, metadata)
        self.manifest["units"][name] = record.to_json()
        self.commit_aux(aux or {}, state)

    def write_aux(self, name: str, tensors: dict, metadata: dict | None = None) -> FileRecord:
        """Write an auxiliary shard; it is committed by the next `write_unit`/`commit_aux` call."""
        return self._write_shard(f"{name}.safetensors", tensors, metadata)

    def commit_aux(self, aux: dict[str, FileRecord], state: dict | None = None) -> None:
        """Record written aux shards (and state) in the manifest, and commit it."""
        self.manifest["aux"].update({key: rec.to_json() for key, rec in aux.items()})
        if state:
            self.manifest["state"].update(state)
        self._commit()

    def record_files(self, names: list[str]) -> None:
        """Record files other than shards that this directory holds (a pack's config.json, tokenizer, model
        card), with their sha256, and commit: readers verify them like shards. They are not part of
        `manifest_hash`: they describe the units, and a model card gains eval results after the fact."""
        files = self.manifest.setdefault("files", {})
        for name in names:
            path = self.path / name
            files[name] = FileRecord(name, sha256_file(path), path.stat().st_size).to_json()
        self._commit()

    def finish(self, summary: dict) -> None:
        self.manifest["summary"] = summary
        self.manifest["complete"] = True
        self._commit()

    def _write_shard(self, filename: str, tensors: dict, metadata: dict | None) -> FileRecord:
        from safetensors.torch import save_file

        contiguous = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        # One key only: safetensors keeps metadata in a hash map whose order changes from process to
        # process, so several keys would make identical shards differ in their bytes.
        meta = {"kbvq": canonical_json(metadata or {})}
        target = self.path / filename
        atomic_write(target, lambda tmp: save_file(contiguous, str(tmp), metadata=meta),
                     size_hint=sum(tensor.nbytes for tensor in contiguous.values()))  # for a full disk's message
        return FileRecord(filename, sha256_file(target), target.stat().st_size)

    def _commit(self) -> None:
        if self.follower:
            return
        if self.journal is not None:
            units = {name: record for name, record in self.manifest["units"].items()
                     if name not in self._journal_base}
            atomic_write_json(self.journal, {"config_hash": self.manifest["config_hash"],
                                             "inputs_hash": self.manifest["inputs_hash"], "units": units,
                                             "aux": self.manifest["aux"], "state": self.manifest["state"]})
            return
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # ---------------------------------------------------------------- torchrun
    def journal_to(self, rank: int) -> None:
        """Commit to this rank's journal from now on, not to the manifest (see the module docstring)."""
        self.journal = self.path / f"journal-rank-{rank:03d}.json"
        self._journal_base = set(self.manifest["units"])

    def merge_journals(self) -> None:
        """Rank 0 at the sync point: fold every rank's journal into the manifest, commit it, delete them."""
        self.journal = None
        found = merge_journals(self.path, self.manifest)
        self._commit()
        self._drop_journals(found)

    @staticmethod
    def _drop_journals(journals: list[Path]) -> None:
        for journal in journals:
            journal.unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading
    def read_unit(self, name: str, device: str = "cpu") -> dict:
        return self._read_record(self.manifest["units"], name, device)

    def read_aux(self, name: str, device: str = "cpu") -> dict:
        return self._read_record(self.manifest["aux"], name, device)

    def read_metadata(self, name: str) -> dict:
        from safetensors import safe_open

        with safe_open(str(self.path / self.manifest["units"][name]["file"]), "pt") as handle:
            return json.loads((handle.metadata() or {}).get("kbvq", "{}"))

    def _read_record(self, records: dict, name: str, device: str) -> dict:
        from safetensors.torch import load

        # Rerunning the stage repairs it: its resume hashes every file and redoes the bad ones.
        redo = f"rerun `kbvq {self.stage} --run {self.path.parent}` to redo it"
        if name not in records:
            raise KbvqError(f"{self.stage} in {self.path.parent} has no shard {name!r}; {redo}")
        record = records[name]
        try:
            data = (self.path / record["file"]).read_bytes()
        except OSError as error:
            raise KbvqError(f"{self.stage} shard {record['file']} in {self.path.parent} cannot be read "
                            f"({error.strerror}); {redo}") from None
        from kbvq_cli.hashing import sha256_bytes

        if sha256_bytes(data) != record["sha256"]:
            raise KbvqError(f"{self.stage} shard {record['file']} in {self.path.parent} is corrupt (sha256 mismatch); "
                            f"{redo}")
        tensors = load(data)
        return {key: value.to(device) for key, value in tensors.items()} if device != "cpu" else tensors

    def _remove_orphans(self) -> None:
        """Delete shards no manifest entry names: written just before a kill, or superseded (a previous
        activations checkpoint whose deletion the kill pre-empted). They were never committed."""
        named = {record["file"] for record in {**self.manifest["units"], **self.manifest["aux"]}.values()}
        for shard in self.path.glob("*.safetensors"):
            if shard.name not in named:
                shard.unlink(missing_ok=True)

    def _verify_own_files(self) -> None:
        """On resume, hash every committed file, units and aux alike; a bad one is dropped from the manifest
        (in memory: the next commit records it) and redone, never used. The stage then knows what to redo
        from what is missing: calibrate, for instance, rewrites lost tokens and recomputes a lost
        activations checkpoint (`kbvq_cli.activations`)."""
        bad = []
        for records in (self.manifest["units"], self.manifest["aux"]):
            for name, record in list(records.items()):
                file = self.path / record["file"]
                if not file.exists() or file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
                    bad.append(record["file"])
                    del records[name]
        if bad:
            from kbvq_cli.console import warn

            warn(f"{self.stage}: {len(bad)} file(s) failed verification and will be redone: {', '.join(bad[:5])}")
            self.manifest["complete"] = False


def merge_journals(path: Path, manifest: dict) -> list[Path]:
    """Fold the journals in `path` made for this manifest's config and inputs into `manifest` (in memory),
    in rank order; the journals read. One made for other settings (left by a refused rerun) is ignored."""
    found = []
    for journal in sorted(Path(path).glob(JOURNALS)):
        try:
            entries = json.loads(journal.read_text())
        except (OSError, ValueError):  # torn it cannot be (atomic), unreadable it may: its shards are redone
            continue
        if (entries.get("config_hash"), entries.get("inputs_hash")) != (manifest["config_hash"],
                                                                        manifest["inputs_hash"]):
            continue
        manifest["units"].update(entries.get("units", {}))
        manifest.setdefault("aux", {}).update(entries.get("aux", {}))
        manifest.setdefault("state", {}).update(entries.get("state", {}))
        found.append(journal)
    return found


def read_manifest(path: Path) -> dict:
    path = Path(path)
    which = f"the manifest of {path.name} in {path.parent}"
    # Without its manifest no shard of the stage can be verified, so nothing of it can be reused.
    redo = (f"none of its shards can be trusted without it; redo the stage with "
            f"`kbvq {path.name} --run {path.parent} --restart`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except OSError as error:
        raise KbvqError(f"{which} is unreadable ({error.strerror}); {redo}") from None
    except ValueError:
        raise KbvqError(f"{which} is unreadable (not valid JSON); {redo}") from None
    required = ("stage", "config_hash", "inputs_hash", "units")
    missing = [key for key in required if key not in manifest] if isinstance(manifest, dict) else ["stage"]
    if missing:
        raise KbvqError(f"{which} lacks {missing[0]!r}; {redo}")
    manifest.setdefault("aux", {})
    manifest.setdefault("state", {})
    return manifest
