"""Rank allocation under a bit budget (`klt-svd --target-bits B`): which rank each layer's projection gets.

Each choice (one decomposed part of one layer) offers ranks 1, 2, ... in order; rank j costs `cost` bits
(docs/method.md §5: `16 (ic + n oc)` for a basis row and its coefficients) and removes `gains[j-1]` of
the estimated output error. The gains of one choice do not increase (they are its sorted singular
values' energies), so taking ranks greedily by gain per bit, skipping any that no longer fits, is the
optimum of the fractional problem up to the one rank where the budget first binds: the greedy total is
within the largest single gain of the integer optimum, and equal to it when every choice costs the same
per rank (tests/test_budget.py checks both against brute force). No torch: pure bookkeeping.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class RankChoice:
    name: str
    gains: tuple[float, ...]  # error removed by rank 1, 2, ...: non-increasing, at most the rank limit long
    cost: int  # bits per rank

    def __post_init__(self):
        if self.cost <= 0:
            raise ValueError(f"{self.name}: a rank must cost a positive number of bits (got {self.cost})")
        if any(later > earlier for earlier, later in zip(self.gains, self.gains[1:])):
            raise ValueError(f"{self.name}: gains must not increase with the rank")


def allocate_ranks(choices: list[RankChoice], budget_bits: int) -> dict[str, int]:
    """The rank of every choice, greedily by gain per bit, spending at most `budget_bits` in all.

    Ties go to the earlier choice in the list, so the result is a function of the inputs alone."""
    ranks = {choice.name: 0 for choice in choices}
    left = budget_bits
    heap = [(-choice.gains[0] / choice.cost, position) for position, choice in enumerate(choices) if choice.gains]
    heapq.heapify(heap)
    while heap:
        _, position = heapq.heappop(heap)
        choice = choices[position]
        if choice.cost > left:
            continue  # every further rank of this choice costs as much: it is closed
        left -= choice.cost
        ranks[choice.name] += 1
        taken = ranks[choice.name]
        if taken < len(choice.gains):
            heapq.heappush(heap, (-choice.gains[taken] / choice.cost, position))
    return ranks


def spent_bits(choices: list[RankChoice], ranks: dict[str, int]) -> int:
    return sum(choice.cost * ranks[choice.name] for choice in choices)


def removed_error(choices: list[RankChoice], ranks: dict[str, int]) -> float:
    return sum(sum(choice.gains[:ranks[choice.name]]) for choice in choices)
