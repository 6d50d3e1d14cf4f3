"""Whether a process of this host still runs: for breaking stale locks and clearing a killed build's leftovers."""

from __future__ import annotations

import os


def process_alive(pid) -> bool:
    """True while process `pid` (an int > 0) exists on this host, including one we may not signal."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True
