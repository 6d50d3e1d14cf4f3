"""A write that failed for want of space or permission, as one line saying what to do.

A full disk, a read-only mount or a directory without write permission are the user's to fix, and a
stage loses nothing to them (finished shards are committed; the shard in flight was a temp file, now
removed), so they are KbvqErrors, not tracebacks. `atomic_write` translates with the file it was
writing and the shard's size; the CLI's `user_errors` translates whatever else (a mkdir, a copy).
"""

from __future__ import annotations

import errno
import math
import os
import re
from pathlib import Path

from kbvq_cli.errors import KbvqError

DISK_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded"}
NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
# safetensors' writer is Rust: its failures arrive as SafetensorError("... (os error 28)"), not OSError.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def error_number(error: BaseException) -> int | None:
    """The errno of a failed write: from an OSError, or from the text of a safetensors error."""
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        match = _RUST_OS_ERROR.search(str(error))
        return int(match.group(1)) if match else None
    return None


def write_error(error: BaseException, path: Path | None = None, size_hint: int | None = None) -> KbvqError | None:
    """The KbvqError for `error` raised while writing `path` (a shard of `size_hint` bytes), or None if
    it is not a full or unwritable disk. Without `path`, the OSError's own file name is used."""
    number = error_number(error)
    if path is None and isinstance(error, OSError) and error.filename:
        path = Path(os.fsdecode(error.filename))
    if number in DISK_FULL:
        where = f" on {mount_of(path)}" if path is not None else ""
        what = f" while writing {unit_name(path)}" if path is not None else ""
        need = f"free {human_size(size_hint)}" if size_hint else "free some space"
        return KbvqError(f"{DISK_FULL[number]}{where}{what}; {need} and rerun (finished shards are kept)")
    if number in NOT_WRITABLE:
        target = str(path) if path is not None else "the run directory"
        fix = ("remount it read-write or pass a --run directory on a writable disk" if number == errno.EROFS
               else f"give this user write access to {path.parent if path else 'it'} or pass another --run directory")
        return KbvqError(f"cannot write {target}: {NOT_WRITABLE[number]}; {fix} (finished shards are kept)")
    return None


def unit_name(path: Path) -> str:
    """`STAGE/UNIT` for a shard (`vq/layer_003.expert_007`), `DIR/NAME` for any other file."""
    name = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return f"{path.parent.name}/{name}"


def mount_of(path: Path) -> str:
    """The mount point holding `path` and what is mounted there, e.g. `/data (/dev/nvme1n1)`."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    while not os.path.ismount(probe):
        probe = probe.parent
    source = None
    try:
        with open("/proc/mounts") as mounts:  # Linux; elsewhere the mount point alone
            for line in mounts:
                fields = line.split()
                if len(fields) > 1 and fields[1] == str(probe):
                    source = fields[0]  # the last entry for a mount point is the one in effect
    except OSError:
        pass
    return f"{probe} ({source})" if source else str(probe)


def human_size(size: int) -> str:
    """Bytes as the user frees them: rounded up, so freeing the amount said is enough."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{math.ceil(10 * size / scale) / 10:.1f} {unit}"
    return f"{size} bytes"
