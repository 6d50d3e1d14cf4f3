"""torch's CPU thread count: running with a given count, and the record that keeps a resume on one count.

Results depend on the thread count in their last bits: LAPACK's eigendecomposition (klt-svd) splits its
work by thread, and so do torch's reductions over tensors above 32768 elements (vq's error figures on a
shared expert); README "Threads and resumes" has the measurement. A stage begun on one count and resumed
on another would therefore not match an uninterrupted run on either. Each
manifest records the count (`runtime.threads`, not hashed: a finished stage is valid whatever machine
reads it) and a resume of partial work on another count is refused unless `--allow-thread-change`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from kbvq_cli.errors import KbvqError


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with exactly `count` torch threads, restoring the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def thread_record() -> dict:
    """What a manifest records of where its stage ran: `{"threads": torch.get_num_threads()}`."""
    import torch

    return {"threads": torch.get_num_threads()}


def check_thread_count(stage_dir, current: dict, allow: bool) -> None:
    """Refuse to resume `stage_dir`'s partial work under another thread count than it was begun with.

    A complete stage computes nothing more, and a stage with nothing committed has nothing to mix, so
    either runs on any count; so does a manifest older than the record (its count is unknown).
    """
    recorded = stage_dir.manifest.get("runtime", {}).get("threads")
    if stage_dir.complete or not stage_dir.has_work or recorded in (None, current["threads"]):
        return
    from kbvq_cli.console import warn

    where = f"{stage_dir.stage} in {stage_dir.path.parent}"
    if allow:
        warn(f"{where} was begun with {recorded} torch thread(s) and resumes with {current['threads']} "
             f"(--allow-thread-change): its result may differ in the last bits from an uninterrupted run")
        return
    raise KbvqError(f"{where} was begun with {recorded} torch thread(s) and this process runs "
                    f"{current['threads']}; resuming would not match an uninterrupted run in the last bits; "
                    f"rerun with OMP_NUM_THREADS={recorded}, or pass --allow-thread-change to resume anyway")
