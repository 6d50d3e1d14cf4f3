"""One writer per run directory: an advisory lock, `RUN/.kbvq.lock`, taken by the CLI around a command.

    with run_lock(Path("runs/q")):
        ...   # a second process's run_lock on runs/q raises KbvqError naming this one

The lock file holds the holder's pid, host, command line and start time (JSON), and the holder keeps an
`flock` on it, which the kernel drops when the process ends however it ends, so a crash never leaves
the run locked: a later writer finds the file with no flock on it, warns that it breaks a stale lock,
and takes it. The file is removed on a normal release. Two kbvq processes writing one run would
interleave their manifest commits and each overwrite the other's view of what is finished.

Who locks (in kbvq_cli/app.py and kbvq_cli/pipeline.py, never inside a stage): every stage command,
`pack` (also `--dense`), `eval` (it writes RUN/eval/results.json), `run` (its run directory for the
whole recipe, and the shared calibration directory while it calibrates there), `table` (through
`run`). Who does not: `report`, which reads only finished stages (each shard hash-checked) and writes
only RUN/report, by atomic renames, so it can run beside a writer (e.g. to see the spectrum while vq
runs); `run --dry-run`; `load_quantized`; `testbed`, whose output directory is no run.

Re-entrant within one process: `kbvq run` holds its run's lock while each stage it calls takes it again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kbvq_cli.errors import KbvqError
from kbvq_cli.processes import process_alive

LOCK_NAME = ".kbvq.lock"
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
COMMAND_LINE: str | None = None  # set by kbvq_cli.app.main: the `kbvq ...` command this process runs


@dataclass
class _Held:
    fd: int
    created: list[Path] = field(default_factory=list)  # directories the lock made, removed again if left empty
    depth: int = 1


_held: dict[str, _Held] = {}  # realpath of a run directory -> this process's hold on it


@contextmanager
def run_lock(run_dir: Path, command: str | None = None) -> Iterator[None]:
    """Hold the lock of `run_dir` (created if needed) for the block; `command` is what others are told."""
    from kbvq_cli.distributed import world

    here = world()
    if here.distributed and not here.leader:  # one torchrun job is one writer: rank 0 holds the lock for it
        yield
        return
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key].depth += 1
        try:
            yield
        finally:
            _held[key].depth -= 1
        return
    try:
        held = _acquire(Path(run_dir), command or current_command())
    except OSError as error:
        if error.errno not in READ_ONLY or not Path(run_dir).is_dir():
            raise
        # A run on a read-only disk can have no writer to exclude: verifying, skipping and reading a
        # finished run go ahead unlocked, and any write the command then needs fails on its own, in one line.
        yield
        return
    _held[key] = held
    try:
        yield
    finally:
        _release(Path(run_dir), _held.pop(key))


@contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[None]:
    """The lock of `run_dir`, and for `calibrate` on a run whose calibrate links to a shared calibration
    (a recipe's `calibration:`), of that directory too: calibrate writes there."""
    link = Path(run_dir) / "calibrate"
    with run_lock(run_dir):
        if stage != "calibrate" or not link.is_symlink():
            yield
            return
        with run_lock(link.resolve().parent):
            yield


def current_command() -> str:
    """What this process runs, for the lock file: the kbvq command line when `kbvq` was started from a
    shell (`main` records it), else this process's own argv (a library caller, a test)."""
    if COMMAND_LINE is not None:
        return COMMAND_LINE
    return shlex.join([Path(sys.argv[0]).name or "python", *sys.argv[1:]])


def _acquire(run_dir: Path, command: str) -> _Held:
    created = _make_dirs(run_dir)  # on a read-only disk this (or the open below) raises: the CLI says so
    try:
        fd = _flock(run_dir)
    except BaseException:
        _remove_dirs(created)
        raise
    try:
        previous = _read_holder(fd)
        if previous:
            _break_stale(run_dir, previous)  # or refuses, leaving another host's file as it is
    except BaseException:
        os.close(fd)
        raise
    held = _Held(fd, created)
    try:
        _write_holder(fd, command)
    except BaseException:  # e.g. a full disk: leave nothing behind
        _release(run_dir, held)
        raise
    return held


def _flock(run_dir: Path) -> int:
    """An fd of `RUN/.kbvq.lock` with our flock on it, or KbvqError naming the process that has it."""
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise KbvqError(f"{run_dir} is in use by {_describe(holder)}; wait for it or stop it") from None
        if _is_current(fd, path):
            return fd
        os.close(fd)  # a holder released (and unlinked) this file between our open and our flock: try again


def _release(run_dir: Path, held: _Held) -> None:
    # Unlink while still holding the flock: a process that opened this file meanwhile sees, once it gets
    # the flock, that the path no longer names it (`_is_current`) and starts over with a new file.
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    os.close(held.fd)
    _remove_dirs(held.created)


def _remove_dirs(created: list[Path]) -> None:
    """Remove the directories the lock made, deepest first, while empty: a refused or failed command
    leaves no empty run behind."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break


def _make_dirs(run_dir: Path) -> list[Path]:
    missing = [directory for directory in (run_dir, *run_dir.parents) if not directory.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _wait_for_holder(fd: int) -> dict:
    """The holder's record; it writes it just after taking the flock, so give it a moment to appear."""
    for _ in range(20):
        holder = _read_holder(fd)
        if holder:
            return holder
        time.sleep(0.05)
    return {}


def _write_holder(fd: int, command: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _describe(holder: dict) -> str:
    if not holder:
        return "another kbvq process (it is starting)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} ({holder.get('command')}) "
            f"since {holder.get('since')}")


def _break_stale(run_dir: Path, holder: dict) -> None:
    """The file names a holder but nobody has the flock: that holder crashed (or was killed)."""
    from kbvq_cli.console import warn

    if holder.get("host") != socket.gethostname():
        # Its flock may not reach us across hosts on every network file system: it may still run.
        raise KbvqError(f"{run_dir} is locked by {_describe(holder)}, and kbvq cannot tell from this host "
                        f"whether it still runs; wait for it or stop it, or if it is gone delete "
                        f"{run_dir / LOCK_NAME}")
    state = "is gone" if not process_alive(holder.get("pid")) else "no longer holds it"
    warn(f"breaking the stale lock of {run_dir}: {_describe(holder)} {state}")
