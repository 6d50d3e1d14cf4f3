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


# Code sizes too (`klt-svd code_sizes: [...]`): each choice is now one (layer, projection), which takes one
# VQ code size for all its matrices and a rank for each part it holds (`down` and a shared expert's own
# `shared.down`). Its estimated error is `factor(code) * (base_error - the gains of the ranks taken)`: the
# rank gains as above, times the fraction of a residual's error that VQ at that code size leaves. The
# error is no longer a sum over ranks, so the greedy works on each choice's lower convex hull of
# (bits, error) over all its (code size, ranks) options (a multiple-choice knapsack): the hull steps of
# every choice taken by error removed per bit, a choice closed when its next step no longer fits. That
# is optimal for the fractional problem up to the first step that does not fit, so the result is within
# the largest single hull step of the integer optimum (tests/test_budget.py, against brute force).


@dataclass(frozen=True)
class CodeOption:
    name: str  # e.g. "2x4": bits x vector length
    cost: int  # bits of the choice's indices, codebooks (and corrections, padding) at rank 0
    factor: float  # the fraction of a residual's error that VQ at this code size leaves (> 0)

    def __post_init__(self):
        if self.cost <= 0 or not self.factor >= 0:
            raise ValueError(f"{self.name}: a code size needs a positive cost and a factor >= 0")


@dataclass(frozen=True)
class CodedChoice:
    name: str
    codes: tuple[CodeOption, ...]  # at least one
    parts: tuple[RankChoice, ...]  # the rank choices it holds (possibly none); their gains remove base_error
    base_error: float  # the error before VQ at rank 0


@dataclass(frozen=True)
class CodedPick:
    code: str
    ranks: dict[str, int]  # part name -> rank


def _rank_path(parts: tuple[RankChoice, ...]) -> list[tuple[int, float, tuple[int, ...]]]:
    """(cumulative bits, cumulative gain, ranks per part) with the parts' ranks merged by gain per bit: the
    vertices of the lower hull of all rank combinations (a Minkowski sum of the parts' concave curves)."""
    steps = sorted(((-gain / part.cost, index, rank) for index, part in enumerate(parts)
                    for rank, gain in enumerate(part.gains)))
    path, ranks, bits, gain = [(0, 0.0, tuple(0 for _ in parts))], [0] * len(parts), 0, 0.0
    for _, index, _ in steps:
        ranks[index] += 1
        bits, gain = bits + parts[index].cost, gain + parts[index].gains[ranks[index] - 1]
        path.append((bits, gain, tuple(ranks)))
    return path


def coded_hull(choice: CodedChoice) -> list[tuple[int, float, CodedPick]]:
    """The choice's options on the lower convex hull of (bits, error), cheapest first, error falling."""
    path = _rank_path(choice.parts)
    points = sorted((code.cost + bits, code.factor * (choice.base_error - gain), position, step)
                    for position, code in enumerate(choice.codes) for step, (bits, gain, _) in enumerate(path))
    hull: list[tuple] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # costs at least as much and removes nothing more
        while len(hull) >= 2:  # drop the last vertex if it lies above the segment to this point (kept on it,
            # so that one code size gives the rank greedy's steps exactly)
            (b0, e0, *_), (b1, e1, *_) = hull[-2], hull[-1]
            if (e1 - e0) * (point[0] - b0) > (point[1] - e0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(point)
    names = [part.name for part in choice.parts]
    return [(bits, error, CodedPick(choice.codes[position].name, dict(zip(names, path[step][2]))))
            for bits, error, position, step in hull]


def allocate_coded(choices: list[CodedChoice], budget_bits: int) -> dict[str, CodedPick] | None:
    """Every choice's code size and ranks for at most `budget_bits` in all (None if even the cheapest
    options do not fit): each starts at its cheapest option, then hull steps greedily by error removed per
    bit. Ties go to the earlier choice in the list, so the result is a function of the inputs alone."""
    hulls = [coded_hull(choice) for choice in choices]
    at = [0] * len(choices)
    left = budget_bits - sum(hull[0][0] for hull in hulls)
    if left < 0:
        return None

    def step_key(position: int):
        (b0, e0, _), (b1, e1, _) = hulls[position][at[position]], hulls[position][at[position] + 1]
        return (-(e0 - e1) / (b1 - b0), position)

    heap = [step_key(position) for position, hull in enumerate(hulls) if len(hull) > 1]
    heapq.heapify(heap)
    while heap:
        _, position = heapq.heappop(heap)
        hull = hulls[position]
        cost = hull[at[position] + 1][0] - hull[at[position]][0]
        if cost > left:
            continue  # closed: a later step of this choice is cheaper per error only along the hull
        left -= cost
        at[position] += 1
        if at[position] + 1 < len(hull):
            heapq.heappush(heap, step_key(position))
    return {choice.name: hulls[position][at[position]][2] for position, choice in enumerate(choices)}


def coded_bits(choice: CodedChoice, pick: CodedPick) -> int:
    code = next(code for code in choice.codes if code.name == pick.code)
    return code.cost + sum(part.cost * pick.ranks[part.name] for part in choice.parts)


def coded_error(choice: CodedChoice, pick: CodedPick) -> float:
    code = next(code for code in choice.codes if code.name == pick.code)
    removed = sum(sum(part.gains[:pick.ranks[part.name]]) for part in choice.parts)
    return code.factor * (choice.base_error - removed)
