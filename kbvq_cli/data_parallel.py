"""Data parallel over calibration sequences (calibrate, bcos --propagate), bit-identical for any world size.

The sequences are cut into fixed blocks of `block_size` (the stage's batch size: one forward pass each),
a partition that does not depend on the world size. Block b runs on rank `b % world`, so round k of a
layer runs blocks `k*world .. k*world + world-1`, one per rank. A statistic is summed within its block
and the block sums are added in block order, starting from zero: after each round every rank gathers
the round's block sums and adds them in rank order, which is block order. One process follows the same
order (a round of one block each), so any world size gives the same bits.

Each rank holds the hidden states of its own blocks only, concatenated in block order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kbvq_cli.distributed import world
from kbvq_cli.errors import KbvqError


@dataclass(frozen=True)
class Blocks:
    """`rows` sequences in blocks of `size`; this rank's share under a world of `ranks`."""

    rows: int
    size: int
    rank: int = 0
    ranks: int = 1

    @classmethod
    def here(cls, rows: int, size: int) -> "Blocks":
        found = world()
        blocks = cls(rows, size, found.rank, found.size)
        if blocks.count < found.size:
            raise KbvqError(f"{rows} calibration sequences in batches of {size} make {blocks.count} block(s), "
                            f"fewer than the {found.size} processes: run fewer processes or a smaller --batch-size")
        return blocks

    @property
    def count(self) -> int:
        return math.ceil(self.rows / self.size)

    @property
    def rounds(self) -> int:
        return math.ceil(self.count / self.ranks)

    def span(self, block: int) -> tuple[int, int]:
        """Rows [begin, end) of `block` among all sequences."""
        return block * self.size, min(self.rows, (block + 1) * self.size)

    def mine(self) -> list[int]:
        return list(range(self.rank, self.count, self.ranks))

    def in_round(self, round_: int, rank: int | None = None) -> int | None:
        """The block `rank` (default this one) runs in round `round_`, None when it has none."""
        block = round_ * self.ranks + (self.rank if rank is None else rank)
        return block if block < self.count else None

    def local_span(self, block: int) -> tuple[int, int]:
        """Rows [begin, end) of `block` in this rank's concatenation of its blocks."""
        begin = sum(self.span(b)[1] - self.span(b)[0] for b in self.mine() if b < block)
        first, last = self.span(block)
        return begin, begin + last - first

    def select(self, everything: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `everything [rows, ...]`, in block order."""
        if self.ranks == 1:
            return everything
        return torch.cat([everything[slice(*self.span(b))] for b in self.mine()])


def add_round(total: dict[str, torch.Tensor] | None, partial: dict[str, torch.Tensor], blocks: Blocks,
              round_: int) -> dict[str, torch.Tensor]:
    """`total` (None: zeros) plus every rank's block sums `partial` of round `round_`, in block order.

    `partial` has the same keys and shapes on every rank (zeros on a rank with no block this round)."""
    if total is None:
        total = {key: torch.zeros_like(value) for key, value in partial.items()}
    valid = [rank for rank in range(blocks.ranks) if blocks.in_round(round_, rank) is not None]
    for key in sorted(partial):
        if blocks.ranks == 1:
            total[key] += partial[key]
            continue
        import torch.distributed as dist

        found = [torch.empty_like(partial[key]) for _ in range(blocks.ranks)]
        dist.all_gather(found, partial[key].contiguous())
        for rank in valid:
            total[key] += found[rank]
    return total


def read_blocks(files: list[dict[str, torch.Tensor]], blocks: Blocks) -> torch.Tensor | None:
    """This rank's rows from activation checkpoints of any world size: each file's `hidden` holds the
    blocks its `blocks` tensor names, concatenated (no `blocks`: all of them). None if one is missing."""
    where = {}
    for tensors in files:
        held = tensors["blocks"].tolist() if "blocks" in tensors else list(range(blocks.count))
        offset = 0
        for block in held:
            begin, end = blocks.span(block)
            where[block] = (tensors["hidden"], offset, offset + end - begin)
            offset += end - begin
    if any(block not in where for block in blocks.mine()):
        return None
    return torch.cat([where[b][0][where[b][1]:where[b][2]] for b in blocks.mine()])
