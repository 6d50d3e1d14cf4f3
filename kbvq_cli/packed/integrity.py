"""A pack directory opened for reading, and the proof that every file in it is the one `kbvq pack` wrote.

A pack's `manifest.json` records every file with its sha256: the shards (`units`), and the config,
generation config, tokenizer files, `model.safetensors.index.json` and `README.md` (`files`). Loading
hashes all of them first (`verify_pack`) and refuses anything that differs, is missing, or is not in
the manifest (a stray `model.safetensors` would otherwise be loaded instead of the index).

A pack lives in `RUN/pack`, or is a copy made by `kbvq pack --out DIR`, whose manifest names the run it
came from (`origin`): every message names the command that rewrites that directory, never one built
from the directory's own name.
"""

from __future__ import annotations

from pathlib import Path

from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import sha256_file
from kbvq_cli.stage_dir import MANIFEST, StageDir, read_manifest

PACK_STAGE = "pack"


def pack_path(path: str | Path) -> Path:
    """The pack directory given itself or the run directory holding it."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / PACK_STAGE / MANIFEST).exists():
        path = path / PACK_STAGE
    if not (path / MANIFEST).exists():
        raise KbvqError(f"{path} is not a packed kbvq model (no {MANIFEST}); run `kbvq pack --run RUN` "
                        f"and pass RUN/pack")
    return path


def repair_command(path: Path, manifest: dict) -> tuple[str, str]:
    """(command, note): the command that rewrites the files of the pack in `path`, i.e. `kbvq pack` on the
    run that made it (which re-hashes its shards, redoes any bad one and rewrites the side files), copying
    again when `path` is a copy; the note says what to substitute when the run is not known."""
    origin = manifest.get("origin")
    if origin:
        return f"kbvq pack --run {origin} --out {path}", ""
    if path.name == PACK_STAGE:
        return f"kbvq pack --run {path.parent}", ""
    return f"kbvq pack --run RUN --out {path}", " (RUN: the run directory that made it)"


def repair_hint(path: Path, manifest: dict, purpose: str = "rewrite it") -> str:
    command, note = repair_command(path, manifest)
    return f"rerun `{command}`{note} to {purpose}"


def open_pack(path: str | Path) -> StageDir:
    """A finished pack directory (its manifest read and checked; no file hashed yet)."""
    path = pack_path(path)
    manifest = read_manifest(path)
    if manifest["stage"] != PACK_STAGE:
        raise KbvqError(f"{path} holds the {manifest['stage']} stage, not a packed model; pass RUN/pack")
    if not manifest.get("complete"):
        raise KbvqError(f"the pack in {path} is unfinished; {repair_hint(path, manifest, 'complete it')}")
    if "files" not in manifest:
        raise KbvqError(f"the pack in {path} was written by an older kbvq and does not record its config and "
                        f"tokenizer files; {repair_hint(path, manifest, 'add them')}")
    return StageDir(path, manifest)


def recorded_files(stage_dir: StageDir) -> dict[str, dict]:
    """File name -> {file, sha256, bytes} of everything the manifest records."""
    manifest = stage_dir.manifest
    return {record["file"]: record for record in [*manifest["units"].values(), *manifest["aux"].values(),
                                                  *manifest["files"].values()]}


def verify_pack(stage_dir: StageDir) -> None:
    """Hash every file of the pack against its manifest; raise a one-line KbvqError naming the first file
    that is missing, differs, or is not part of the pack."""
    path, fix = stage_dir.path, repair_hint(stage_dir.path, stage_dir.manifest)
    records = recorded_files(stage_dir)
    for name, record in sorted(records.items()):
        file = path / name
        if not file.exists():
            raise KbvqError(f"{name} is missing from the pack in {path}; {fix}")
        if file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
            raise KbvqError(f"{name} in {path} is corrupt or was edited (sha256 differs from the pack's manifest); {fix}")
    for file in sorted(path.iterdir()):
        if file.name not in records and file.name != MANIFEST and not file.name.startswith("."):
            raise KbvqError(f"{file.name} in {path} is not part of the pack (not in its manifest); remove it, "
                            f"or {repair_hint(path, stage_dir.manifest, 'rewrite the pack')}")


def pack_directory(path: str | Path) -> StageDir:
    """A finished pack directory, every file verified (see `verify_pack`)."""
    stage_dir = open_pack(path)
    verify_pack(stage_dir)
    return stage_dir
