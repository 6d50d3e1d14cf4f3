"""The rank allocation of `klt-svd --target-bits` (kbvq_cli/budget.py) against brute force on tiny cases."""

import itertools
import random

import pytest

from kbvq_cli.budget import RankChoice, allocate_ranks, removed_error, spent_bits


def _brute_force(choices, budget):
    best = -1.0
    for ranks in itertools.product(*[range(len(c.gains) + 1) for c in choices]):
        chosen = {c.name: k for c, k in zip(choices, ranks)}
        if spent_bits(choices, chosen) <= budget:
            best = max(best, removed_error(choices, chosen))
    return best


def _random_choices(rng, count, equal_costs):
    choices = []
    for index in range(count):
        gains = sorted((rng.random() for _ in range(rng.randint(1, 4))), reverse=True)
        cost = 10 if equal_costs else rng.randint(3, 17)
        choices.append(RankChoice(f"layer{index}", tuple(gains), cost))
    return choices


@pytest.mark.parametrize("seed", range(40))
def test_greedy_equals_brute_force_when_ranks_cost_alike(seed):
    rng = random.Random(seed)
    choices = _random_choices(rng, 4, equal_costs=True)
    budget = rng.randint(0, 10 * sum(len(c.gains) for c in choices))
    ranks = allocate_ranks(choices, budget)
    assert spent_bits(choices, ranks) <= budget
    assert removed_error(choices, ranks) == pytest.approx(_brute_force(choices, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_greedy_respects_the_budget_and_is_within_one_gain_of_the_optimum(seed):
    rng = random.Random(1000 + seed)
    choices = _random_choices(rng, 4, equal_costs=False)
    budget = rng.randint(0, sum(c.cost * len(c.gains) for c in choices))
    ranks = allocate_ranks(choices, budget)
    assert spent_bits(choices, ranks) <= budget
    assert all(0 <= ranks[c.name] <= len(c.gains) for c in choices)
    largest = max(g for c in choices for g in c.gains)
    optimum = _brute_force(choices, budget)
    assert optimum - largest - 1e-12 <= removed_error(choices, ranks) <= optimum + 1e-12
    # nothing left over that would still fit: every choice is full or its next rank costs more than what is left
    left = budget - spent_bits(choices, ranks)
    assert all(ranks[c.name] == len(c.gains) or c.cost > left for c in choices)


def test_a_hand_worked_case():
    # A: 0.5, 0.1 at 10 bits each; B: 0.4, 0.3 at 20 bits each. 40 bits: A1 (0.05/bit), B1 (0.02), B2? no
    # (0.015/bit but 20 bits > 10 left), A2 (0.01/bit, fits): {A: 2, B: 1}, removing 1.0.
    choices = [RankChoice("A", (0.5, 0.1), 10), RankChoice("B", (0.4, 0.3), 20)]
    assert allocate_ranks(choices, 40) == {"A": 2, "B": 1}
    assert allocate_ranks(choices, 9) == {"A": 0, "B": 0}
    assert allocate_ranks(choices, 10**6) == {"A": 2, "B": 2}


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="must not increase"):
        RankChoice("A", (0.1, 0.5), 10)
    with pytest.raises(ValueError, match="positive"):
        RankChoice("A", (0.5,), 0)


# Code sizes too: each choice one code size of several and a rank per part it holds (kbvq_cli/budget.py).

from kbvq_cli.budget import CodedChoice, CodedPick, CodeOption, allocate_coded, coded_bits, coded_error, coded_hull


def _coded_options(choice):
    for code in choice.codes:
        for ranks in itertools.product(*[range(len(p.gains) + 1) for p in choice.parts]):
            yield CodedPick(code.name, {p.name: r for p, r in zip(choice.parts, ranks)})


def _coded_brute_force(choices, budget):
    best = None
    for picks in itertools.product(*[list(_coded_options(c)) for c in choices]):
        if sum(coded_bits(c, p) for c, p in zip(choices, picks)) <= budget:
            error = sum(coded_error(c, p) for c, p in zip(choices, picks))
            best = error if best is None else min(best, error)
    return best


def _random_coded(rng, count):
    choices = []
    for index in range(count):
        parts = tuple(RankChoice(f"c{index}.p{p}", tuple(sorted((rng.random() for _ in range(rng.randint(1, 3))),
                                                               reverse=True)), rng.randint(3, 17))
                      for p in range(rng.randint(0, 2)))
        base = sum(sum(p.gains) for p in parts) + rng.random()
        # a cheaper, worse code and dearer, better ones, in any order
        codes = tuple(CodeOption(f"k{k}", rng.randint(5, 40), rng.uniform(0.05, 1.0)) for k in range(rng.randint(1, 3)))
        choices.append(CodedChoice(f"c{index}", codes, parts, base))
    return choices


@pytest.mark.parametrize("seed", range(40))
def test_code_sizes_greedy_respects_the_budget_and_is_within_one_hull_step_of_the_optimum(seed):
    rng = random.Random(5000 + seed)
    choices = _random_coded(rng, 3)
    floor = sum(min(code.cost for code in c.codes) for c in choices)
    most = sum(max(code.cost for code in c.codes) + sum(p.cost * len(p.gains) for p in c.parts) for c in choices)
    budget = rng.randint(floor - 3, most + 3)
    picks = allocate_coded(choices, budget)
    optimum = _coded_brute_force(choices, budget)
    if budget < floor:
        assert picks is None and optimum is None
        return
    spent = sum(coded_bits(c, picks[c.name]) for c in choices)
    error = sum(coded_error(c, picks[c.name]) for c in choices)
    assert spent <= budget
    largest = max((h0[1] - h1[1] for c in choices for h0, h1 in zip(coded_hull(c), coded_hull(c)[1:])), default=0.0)
    assert optimum - 1e-12 <= error <= optimum + largest + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_one_code_size_gives_the_rank_greedys_ranks(seed):
    rng = random.Random(7000 + seed)
    parts = [RankChoice(f"layer{i}", tuple(sorted({rng.random() + 0.01 for _ in range(rng.randint(1, 4))},
                                                  reverse=True)), rng.randint(3, 17)) for i in range(4)]
    budget = rng.randint(0, sum(c.cost * len(c.gains) for c in parts))
    coded = [CodedChoice(p.name, (CodeOption("2x4", 100, 1.0),), (p,), sum(p.gains) + 1.0) for p in parts]
    picks = allocate_coded(coded, budget + 400)
    assert {name: pick.ranks[name] for name, pick in picks.items()} == allocate_ranks(parts, budget)


def test_a_hand_worked_code_size_case():
    # One choice, base error 1, one part (gains 0.5, 0.25 at 10 bits each); codes "a" (100 bits, factor 0.5)
    # and "b" (130 bits, factor 0.2). Options: a0 (100, .5), a1 (110, .25), a2 (120, .125), b0 (130, .2),
    # b1 (140, .1), b2 (150, .05). b0 costs more than a2 and removes less; b1 lies above the segment a2 -> b2;
    # so the hull is a0, a1, a2, b2 (-.025, -.0125, -.0025 per bit).
    choice = CodedChoice("x", (CodeOption("a", 100, 0.5), CodeOption("b", 130, 0.2)),
                         (RankChoice("x.p", (0.5, 0.25), 10),), 1.0)
    assert [(bits, pick.code, pick.ranks["x.p"]) for bits, _, pick in coded_hull(choice)] == [
        (100, "a", 0), (110, "a", 1), (120, "a", 2), (150, "b", 2)]
    assert allocate_coded([choice], 99) is None
    assert allocate_coded([choice], 119)["x"] == CodedPick("a", {"x.p": 1})
    assert allocate_coded([choice], 150)["x"] == CodedPick("b", {"x.p": 2})
    # a code that costs more and removes less is never taken
    worse = CodedChoice("y", (CodeOption("a", 100, 0.5), CodeOption("c", 200, 0.6)), (), 1.0)
    assert [pick.code for _, _, pick in coded_hull(worse)] == ["a"]
