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
