"""A stage's directory: safetensors shards plus `manifest.json`, the commit point of every write.

Protocol (shard first, manifest last):
1. a unit's shard is written atomically and its sha256 taken from the file on disk;
2. the manifest, listing every finished unit with its hash, is rewritten atomically.
A killed run therefore loses at most the shard in flight; anything not in the manifest does not exist.

The manifest also records the hash of the whole resolved stage config and of the stage's inputs
(model files, data selection, upstream manifests). Reopening a directory whose config or inputs
differ is refused, naming what changed, unless the caller asks for a restart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kbvq_cli import __version__
from kbvq_cli.atomic import atomic_write, atomic_write_json, remove_stale_temps
from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import canonical_json, hash_json, sha256_file

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileRecord:
    file: str
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable paths where two JSON-like values differ (for the 'what changed' message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                changes.append(f"{path} added")
            elif key not in new:
                changes.append(f"{path} removed")
            else:
                changes.extend(_diff(old[key], new[key], path))
        return changes
    if old != new:
        show = lambda v: (str(v)[:40] + "…") if len(str(v)) > 40 else str(v)  # noqa: E731
        return [f"{prefix or 'value'}: {show(old)} -> {show(new)}"]
    return []


class StageDir:
    """One stage's output directory. Create with `open_for_write` or `open_finished`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    # ---------------------------------------------------------------- opening
    @classmethod
    def open_for_write(
        cls, run_dir: Path, stage: str, config: dict, inputs: dict, *, restart: bool = False
    ) -> "StageDir":
        """Create the stage directory, or reopen it to resume after checking config and inputs.

        Every finished shard is hashed on resume; one that fails is dropped and redone, and reported.
        """
        path = Path(run_dir) / stage
        if restart and path.exists():
            shutil.rmtree(path)
        fresh = {
            "stage": stage,
            "tool_version": __version__,
            "config": config,
            "config_hash": hash_json(config),
            "inputs": inputs,
            "inputs_hash": hash_json(inputs),
            "units": {},
            "aux": {},
            "state": {},
            "complete": False,
            "summary": {},
        }
        existing = read_manifest(path) if (path / MANIFEST).exists() else None
        if existing is None:
            path.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path)
            stage_dir = cls(path, fresh)
            stage_dir._commit()
            return stage_dir
        cls._refuse_if_changed(path, stage, existing, fresh)
        remove_stale_temps(path)
        stage_dir = cls(path, existing)
        stage_dir._remove_orphans()
        stage_dir._verify_own_units()
        return stage_dir

    @staticmethod
    def _refuse_if_changed(path: Path, stage: str, existing: dict, fresh: dict) -> None:
        changes = []
        if existing.get("config_hash") != fresh["config_hash"]:
            changes += _diff(existing.get("config", {}), fresh["config"], "config")
        if existing.get("inputs_hash") != fresh["inputs_hash"]:
            changes += _diff(existing.get("inputs", {}), fresh["inputs"], "inputs")
        if changes:
            listed = "; ".join(changes[:4]) + ("; …" if len(changes) > 4 else "")
            raise KbvqError(
                f"{stage} in {path} was made with other settings ({listed}); "
                f"pass --restart to redo it, or use another --run directory"
            )

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
        atomic_write(target, lambda tmp: save_file(contiguous, str(tmp), metadata=meta))
        return FileRecord(filename, sha256_file(target), target.stat().st_size)

    def _commit(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

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

        if name not in records:
            raise KbvqError(f"{self.stage} in {self.path.parent} has no shard {name!r}; rerun `kbvq {self.stage}`")
        record = records[name]
        data = (self.path / record["file"]).read_bytes()
        from kbvq_cli.hashing import sha256_bytes

        if sha256_bytes(data) != record["sha256"]:
            raise KbvqError(
                f"{self.stage} shard {record['file']} in {self.path.parent} is corrupt (sha256 mismatch); "
                f"rerun `kbvq {self.stage} --run {self.path.parent} --restart` to redo the stage"
            )
        tensors = load(data)
        return {key: value.to(device) for key, value in tensors.items()} if device != "cpu" else tensors

    def _remove_orphans(self) -> None:
        """Delete shards no manifest entry names: written just before a kill, or superseded (a previous
        activations checkpoint whose deletion the kill pre-empted). They were never committed."""
        named = {record["file"] for record in {**self.manifest["units"], **self.manifest["aux"]}.values()}
        for shard in self.path.glob("*.safetensors"):
            if shard.name not in named:
                shard.unlink(missing_ok=True)

    def _verify_own_units(self) -> None:
        """On resume, hash every finished shard; a bad one is dropped and redone, never used."""
        bad = []
        for name, record in list(self.manifest["units"].items()):
            file = self.path / record["file"]
            if not file.exists() or file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
                bad.append(record["file"])
                del self.manifest["units"][name]
        if bad:
            from kbvq_cli.console import warn

            warn(f"{self.stage}: {len(bad)} shard(s) failed verification and will be redone: {', '.join(bad[:5])}")
            self.manifest["complete"] = False
            self._commit()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise KbvqError(f"manifest of {path} is unreadable ({error}); pass --restart to redo this stage") from None
    for key in ("stage", "config_hash", "inputs_hash", "units"):
        if key not in manifest:
            raise KbvqError(f"manifest of {path} lacks {key!r}; pass --restart to redo this stage")
    manifest.setdefault("aux", {})
    manifest.setdefault("state", {})
    return manifest
