"""Expert redundancy measures (kbvq_cli/redundancy.py) against float64 references, and on a checkpoint."""

import itertools

import numpy as np
import torch

from kbvq_cli.redundancy import (checkpoint_redundancy, expert_energy_share, layer_redundancy,
                                 mean_pairwise_similarity, stacked_energy_share)


def _weights(seed=0, shape=(5, 6, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_similarity_is_the_mean_pairwise_cosine():
    weights = _weights()
    flat = weights.numpy().reshape(5, -1)
    expected = np.mean([flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j])
                        for i, j in itertools.permutations(range(5), 2)])
    assert abs(mean_pairwise_similarity(weights.float()) - expected) < 1e-6
    copies = weights[:1].repeat(4, 1, 1)
    assert abs(mean_pairwise_similarity(copies) - 1) < 1e-12
    assert abs(mean_pairwise_similarity(torch.stack([weights[0], -weights[0]])) + 1) < 1e-12


def test_stacked_energy_share_is_that_of_the_stack_s_singular_values():
    weights = _weights(1)
    singular = np.linalg.svd(weights.numpy().reshape(-1, 8), compute_uv=False)
    for k in (1, 3, 8):
        assert abs(stacked_energy_share(weights, k) - (singular[:k] ** 2).sum() / (singular ** 2).sum()) < 1e-12
    one = np.linalg.svd(weights[2].numpy(), compute_uv=False)
    single = [(np.linalg.svd(w, compute_uv=False)[:2] ** 2).sum() / (np.linalg.svd(w, compute_uv=False) ** 2).sum()
              for w in weights.numpy()]
    assert abs(expert_energy_share(weights, 2) - np.mean(single)) < 1e-12
    # copies of one expert: the stack holds that expert's spectrum, its share is the expert's own
    copies = weights[2:3].repeat(4, 1, 1)
    share = (one[:2] ** 2).sum() / (one ** 2).sum()
    assert abs(stacked_energy_share(copies, 2) - share) < 1e-12 and abs(expert_energy_share(copies, 2) - share) < 1e-12
    assert stacked_energy_share(weights, 2) < expert_energy_share(weights, 2)


def test_layer_and_checkpoint_redundancy(tiny_model_dir):
    entry = layer_redundancy({"gate": _weights(2)}, ranks=(1, 2))["gate"]
    assert set(entry) == {"similarity", "stacked_energy", "expert_energy"} and set(entry["stacked_energy"]) == {"1", "2"}
    found = checkpoint_redundancy(str(tiny_model_dir("qwen2_moe")))
    assert set(found["layers"]) == {"0", "1"} and set(found["layers"]["0"]) == {"gate", "up", "down"}
    mean = found["mean"]
    assert abs(mean["similarity"]) < 0.2  # random experts share little
    assert 0 < mean["stacked_energy"]["1"] < mean["expert_energy"]["1"] < 1
    assert mean["stacked_energy"]["16"] >= mean["stacked_energy"]["4"] >= mean["stacked_energy"]["1"]
