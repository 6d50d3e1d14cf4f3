"""Content hashes: of files (streamed), of JSON-able settings (canonical form), and a file-hash cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_json(obj: Any) -> str:
    """Hash of the whole object in canonical JSON: every field counts, none is hand-picked."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def cache_dir() -> Path:
    return Path(os.environ.get("KBVQ_CACHE", Path.home() / ".cache" / "kbvq"))


class FileHashCache:
    """sha256 of large files, remembered by (path, size, mtime) so a 60 GB model is read once.

    A file rewritten in place changes its mtime, so a stale entry is never used for changed content.
    """

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "file-hashes.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _key(path: Path) -> str:
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def sha256(self, path: Path) -> str:
        key = self._key(path)
        if key not in self.entries:
            self.entries[key] = sha256_file(path)
            self._save()
        return self.entries[key]

    def _save(self) -> None:
        from kbvq_cli.atomic import atomic_write_json

        try:
            atomic_write_json(self.path, self.entries)
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not stop a run
