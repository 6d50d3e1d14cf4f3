"""`python pause_rank.py RANK UNITS MARKER kbvq-args...` under torchrun: run kbvq, and on rank RANK stop once
it has committed UNITS units (to the manifest, or to its own journal), writing its pid to MARKER.

The test then SIGKILLs that rank, which ends the job (torchrun stops the others), exactly at a known
commit, however fast or loaded the machine is. The other ranks are the real `kbvq`.
"""

from __future__ import annotations

import os
import sys
import threading


def pause_after(rank: int, units: int, marker: str) -> None:
    from kbvq_cli.distributed import world
    from kbvq_cli.stage_dir import StageDir

    commit = StageDir._commit

    def commit_then_pause(self) -> None:
        commit(self)
        if self.follower or world().rank != rank or self.manifest.get("complete"):
            return
        done = len(self.manifest["units"]) - (len(self._journal_base) if self.journal is not None else 0)
        if done >= units:
            with open(marker + ".tmp", "w") as handle:
                handle.write(str(os.getpid()))
            os.replace(marker + ".tmp", marker)
            threading.Event().wait()  # until SIGKILL

    StageDir._commit = commit_then_pause


if __name__ == "__main__":
    pause_after(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    from kbvq_cli.app import main

    sys.argv = ["kbvq", *sys.argv[4:]]
    main()
