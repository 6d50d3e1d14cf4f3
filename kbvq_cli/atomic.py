"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

A reader therefore sees either the old file or the complete new one, never a torn write; a killed
process leaves at most a `*.tmp-*` file behind, which the next writer of that name replaces.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from kbvq_cli.disk_errors import write_error


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None], size_hint: int | None = None) -> None:
    """Call `write(tmp_path)` to produce the file, then move it over `path` atomically.

    A full disk or an unwritable directory raises KbvqError naming `path` (and `size_hint`, the bytes
    the file needs, when the caller knows them); the temp file is gone by then, so its space is free.
    """
    path = Path(path)
    try:
        _write_and_replace(path, write)
    except Exception as error:
        translated = write_error(error, path, size_hint)
        if translated is None:
            raise
        raise translated from None


def _write_and_replace(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts should be readable like any file
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, unless the file already holds exactly these bytes: rewriting
    identical side files and manifests would make every rerun of a finished run write (and fail on a
    read-only disk) for nothing."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass  # unreadable: write it
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(directory: Path) -> None:
    """Delete temp files a killed writer left behind (they were never committed)."""
    for stale in Path(directory).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
