"""Terminal output: one rich console on stderr, headings, warnings and errors, and progress bars.

Messages print literally. They carry paths, recipe values and exception text, any of which can hold
square brackets (`pip install 'kbvq[eval]'`) that rich markup would take for a style tag and drop, or
`:name:` that it would turn into an emoji; so the console interprets neither, and kbvq's own styling
(the red `error:`, the bold stage headings) is given as styles on Text, never as markup in a string.

Under torchrun only rank 0 speaks: the other ranks print errors alone, named by their rank, and rank 0's
progress bars count the units every rank has finished (`set_others_progress`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False, markup=False, emoji=False)
_others: list[Callable[[], int]] = []  # rank 0 under torchrun: how many units the other ranks have done
POLL_S = 2.0  # how often rank 0 looks at the other ranks' progress


def _quiet() -> bool:
    from kbvq_cli.distributed import world

    here = world()
    return here.distributed and not here.leader


def info(message: str) -> None:
    if not _quiet():
        console.print(message)


def heading(message: str) -> None:
    """A bold line opening a step of a longer command (`== vq` in `kbvq run`)."""
    if not _quiet():
        console.print(Text(message, style="bold"))


def warn(message: str) -> None:
    if not _quiet():
        console.print(Text.assemble(("warning:", "yellow"), " ", message))


def error(message: str) -> None:
    """`error: MESSAGE` on one line (soft wrap: the terminal folds it, rich inserts no line breaks)."""
    if _quiet():
        from kbvq_cli.distributed import world

        message = f"rank {world().rank}: {message}"
    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


def set_others_progress(count: Callable[[], int] | None) -> None:
    """Under torchrun, while a stage runs (every rank, None when it ends): rank 0 adds `count()` (units
    the other ranks have finished) to its progress bars; the others pass `lambda: 0`."""
    _others.clear()
    if count is not None:
        _others.append(count)


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A progress display: description, bar, done/total, elapsed, ETA."""
    progress = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=_quiet(),
    )
    with progress, _counting_others(progress):
        yield progress


@contextmanager
def _counting_others(progress: Progress) -> Iterator[None]:
    """While the bar shows, advance its first task by what the other ranks finish (polled). Every rank
    leaves the bar together, so rank 0's stays until the last rank has finished its share and ends at
    the whole job's total; a rank that fails leaves at once (torchrun then ends the job)."""
    if not _others:
        yield
        return
    count, stop, applied = _others[0], threading.Event(), [0]

    def apply() -> None:
        if progress.task_ids:
            done = count()
            progress.advance(progress.task_ids[0], done - applied[0])
            applied[0] = done

    def poll() -> None:
        while not stop.wait(POLL_S):
            apply()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    from kbvq_cli.distributed import arrive_together

    arrive_together(apply, POLL_S)
    apply()
