"""`python pause_after_commit.py UNITS FD kbvq-args...`: run kbvq, and stop once a stage has committed UNITS units.

After the manifest commit that first names UNITS finished units (stage still incomplete), the process
writes `paused <units>` to file descriptor FD and waits to be killed. A test that kills it then knows
exactly what was committed, whether the machine is fast or loaded: no race between the kill and the
run's progress, and no run that finishes before the kill lands. Everything else is the real `kbvq`.
"""

from __future__ import annotations

import os
import sys
import threading


def pause_after(units: int, fd: int) -> None:
    from kbvq_cli.stage_dir import StageDir

    commit = StageDir._commit

    def commit_then_pause(self) -> None:
        commit(self)  # the manifest is on disk, fsynced: what a kill right after this commit leaves
        if len(self.manifest["units"]) >= units and not self.manifest.get("complete"):
            os.write(fd, f"paused {len(self.manifest['units'])}\n".encode())
            os.close(fd)
            threading.Event().wait()  # until SIGKILL

    StageDir._commit = commit_then_pause


if __name__ == "__main__":
    pause_after(int(sys.argv[1]), int(sys.argv[2]))
    from kbvq_cli.app import main

    sys.argv = ["kbvq", *sys.argv[3:]]
    main()
