"""Running a stage under torchrun: the world, the process group, unit assignment and sync points.

    torchrun --nproc-per-node 8 --no-python kbvq vq --run RUN

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process it starts;
with WORLD_SIZE above 1 every rank runs the same command. Without torchrun (WORLD_SIZE unset or 1)
nothing here does anything, and torch.distributed is never imported (`kbvq --help` stays light).

The process group is made on first use: gloo for CPU tensors, and NCCL as well when the stage computes
on CUDA (`cpu:gloo,cuda:nccl`), each rank on the GPU LOCAL_RANK names. Control traffic (barriers,
statuses) always runs on CPU tensors, so on gloo.

Sync points exchange a status: a rank that failed before one says so there, and every other rank then
leaves quietly (`PeerFailed`) while the failing rank's own one-line error reaches the user. A rank that
dies outright ends the job through torchrun, which stops the others.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

from kbvq_cli.errors import KbvqError

T = TypeVar("T")
# How long a collective may wait for a slow rank before it is taken for dead (seconds). A sync point
# waits for the slowest rank's share of a stage, which on a large model is hours, so the default is long.
TIMEOUT_ENV = "KBVQ_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


class PeerFailed(KbvqError):
    """Another rank failed and has printed its error: this rank leaves without printing its own."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes manifests and shows progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise KbvqError(f"{name}={value!r} is not an integer; launch kbvq with torchrun, which sets it") from None


def world() -> World:
    """This process's place in the job, from torchrun's environment (a world of one without it)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size > 1 and not 0 <= rank < size:
        raise KbvqError(f"RANK={rank} is outside WORLD_SIZE={size}; launch kbvq with torchrun")
    return World(rank, size, _env_int("LOCAL_RANK", 0))


_group_device: list[str] = []  # the device type the process group was made for, once made


def ensure_group(device: str = "cpu") -> None:
    """Make the default process group if this is a distributed job and none exists yet."""
    here = world()
    if not here.distributed or _group_device:
        return
    import datetime

    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(here.local_rank)
    timeout = datetime.timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
    _group_device.append("cuda" if cuda else "cpu")


def local_device(device: str) -> str:
    """The device of this rank: under torchrun a plain `cuda` means this rank's own GPU."""
    here = world()
    if here.distributed and device == "cuda":
        return f"cuda:{here.local_rank}"
    return device


def sync(failure: BaseException | None = None) -> None:
    """A barrier that also exchanges each rank's status: raises `PeerFailed` on every rank when any
    rank arrives with a failure (that rank re-raises its own error, which its caller prints)."""
    if not world().distributed:
        if failure is not None:
            raise failure
        return
    statuses = all_gather_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    failed = [rank for rank, status in enumerate(statuses) if status is not None]
    if failed:
        raise PeerFailed(f"rank {failed[0]} failed: {statuses[failed[0]]}")


def arrive_together(poll: Callable[[], None], every_s: float) -> None:
    """Wait until every rank has called this too, calling `poll()` every `every_s` seconds meanwhile (rank
    0's progress counts the others' units while they finish). A no-op without torchrun."""
    if not world().distributed:
        return
    ensure_group()
    import time

    import torch
    import torch.distributed as dist

    arrived = dist.all_reduce(torch.zeros(1), async_op=True)  # a CPU tensor: on gloo, like every control message
    last = time.monotonic()
    while not arrived.is_completed():
        time.sleep(0.05)
        if time.monotonic() - last >= every_s:
            poll()
            last = time.monotonic()
    arrived.wait()


def all_gather_object(value) -> list:
    """`value` of every rank, in rank order (a world of one: `[value]`). Small values only (JSON-like)."""
    if not world().distributed:
        return [value]
    ensure_group()
    import torch.distributed as dist

    found = [None] * world().size
    dist.all_gather_object(found, value)
    return found


def assign(costs: Mapping[str, float], size: int) -> dict[str, int]:
    """Unit name -> rank, from each unit's cost estimate (e.g. its parameter count): longest processing
    time first (ties by name), each unit to the rank with the least work so far (ties by rank). A pure
    function of the names, the costs and the world size, so every rank computes the same assignment."""
    order = sorted(costs, key=lambda name: (-costs[name], name))
    loads = [(0.0, rank) for rank in range(size)]
    heapq.heapify(loads)
    owner = {}
    for name in order:
        load, rank = heapq.heappop(loads)
        owner[name] = rank
        heapq.heappush(loads, (load + costs[name], rank))
    return owner


def mine(items: Sequence[T], name: Callable[[T], str], cost: Callable[[T], float] | None = None) -> list[T]:
    """The items of `items` this rank does, in their given order (all of them without torchrun). `cost`
    estimates an item's work (same on every rank: from shapes or the model's config); default 1 each."""
    here = world()
    if not here.distributed:
        return list(items)
    costs = {name(item): float(cost(item)) if cost else 1.0 for item in items}
    owner = assign(costs, here.size)
    return [item for item in items if owner[name(item)] == here.rank]


def rank_zero_alone(command: str) -> bool:
    """Whether this process runs `command`, one that is not distributed: under torchrun rank 0 runs it
    (so a script that launches every stage with torchrun works for it too) and the other ranks leave at
    once, quietly and successfully; without torchrun, always."""
    from kbvq_cli.console import info

    here = world()
    if here.distributed and here.leader:
        info(f"{command}: runs in one process; under torchrun rank 0 runs it and the other {here.size - 1} "
             f"process(es) leave")
    return here.leader


def leave_on_error(error: BaseException) -> bool:
    """Whether this rank should print `error` itself: every rank prints its own failure except one whose
    failure is a peer's (`PeerFailed`). A rank other than 0 waits a moment first: when the same error hits
    every rank (a refused command), rank 0 prints it and torchrun stops the others before they repeat it."""
    if isinstance(error, PeerFailed):
        return False
    here = world()
    if here.distributed and not here.leader:
        import time

        time.sleep(2.0)
    return True


def shutdown() -> None:
    """Tear the process group down (at the end of a command), so torchrun sees a clean exit."""
    if _group_device:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _group_device.clear()
