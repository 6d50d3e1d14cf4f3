"""Terminal output: one rich console on stderr, headings, warnings and errors, and progress bars.

Messages print literally. They carry paths, recipe values and exception text, any of which can hold
square brackets (`pip install 'kbvq[eval]'`) that rich markup would take for a style tag and drop, or
`:name:` that it would turn into an emoji; so the console interprets neither, and kbvq's own styling
(the red `error:`, the bold stage headings) is given as styles on Text, never as markup in a string.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


def info(message: str) -> None:
    console.print(message)


def heading(message: str) -> None:
    """A bold line opening a step of a longer command (`== vq` in `kbvq run`)."""
    console.print(Text(message, style="bold"))


def warn(message: str) -> None:
    console.print(Text.assemble(("warning:", "yellow"), " ", message))


def error(message: str) -> None:
    """`error: MESSAGE` on one line (soft wrap: the terminal folds it, rich inserts no line breaks)."""
    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


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
    )
    with progress:
        yield progress
