"""How much the routed experts of an MoE checkpoint share: what IDRE (docs/method.md §2) can remove.

Two measures per MoE layer and projection, from the weights alone (no calibration data), float64:

- **pairwise expert similarity**: the mean over pairs `i != j` of the cosine `<W_i, W_j>_F / (|W_i| |W_j|)`.
  It is the output similarity of the report (`Tr(W_i C W_j^T) / ...`) with `C = I`: the same for
  inputs that excite every direction alike. Copies score 1; independently trained experts about 0.
- **stacked energy share**: the share of the stacked experts' energy `||[W_1; ...; W_E]||_F^2` that their
  top-`k` singular values hold, `sum_{j<=k} s_j^2 / sum_j s_j^2`, from the Gram matrix `sum_i W_i^T W_i`
  (`ic x ic`), exactly as klt-svd forms it with `T = I`. Beside it, the same share of each expert
  alone, averaged: for copies the two are equal (the stack is one expert repeated); for experts that
  share nothing the stack's share is far below the single expert's.
"""

from __future__ import annotations

import torch

RANKS = (1, 4, 16)


def mean_pairwise_similarity(weights: torch.Tensor) -> float:
    """Mean off-diagonal cosine similarity of the flattened `weights [E, oc, ic]` (float64); needs E >= 2."""
    flat = weights.double().flatten(1)
    norms = flat.norm(dim=1).clamp_min(1e-300)
    cosine = (flat @ flat.T) / norms[:, None] / norms[None, :]
    count = weights.shape[0]
    return float((cosine.sum() - cosine.diagonal().sum()) / (count * (count - 1)))


def energy_share(gram: torch.Tensor, k: int) -> float:
    """Share of `Tr(G)` in the top `k` eigenvalues of a PSD Gram matrix `G [ic, ic]` (float64)."""
    eigenvalues = torch.linalg.eigvalsh(gram.double()).clamp_min(0).flip(0)
    return float(eigenvalues[:k].sum() / eigenvalues.sum().clamp_min(1e-300))


def stacked_energy_share(weights: torch.Tensor, k: int) -> float:
    """Top-`k` energy share of the stack `[W_1; ...; W_E]` of `weights [E, oc, ic]` (its Gram `sum W_i^T W_i`)."""
    w = weights.double()
    return energy_share(torch.einsum("eoi,eoj->ij", w, w), k)


def expert_energy_share(weights: torch.Tensor, k: int) -> float:
    """Top-`k` energy share of each expert of `weights [E, oc, ic]` alone, averaged over the experts."""
    w = weights.double()
    return sum(energy_share(w[e].T @ w[e], k) for e in range(w.shape[0])) / w.shape[0]


def layer_redundancy(routed: dict[str, torch.Tensor], ranks=RANKS) -> dict[str, dict]:
    """projection -> {similarity, stacked_energy: {k: share}, expert_energy: {k: share}} for one layer's
    routed experts (`routed[projection]` is `[E, oc, ic]`)."""
    found = {}
    for projection, weights in routed.items():
        found[projection] = {
            "similarity": round(mean_pairwise_similarity(weights), 6),
            "stacked_energy": {str(k): round(stacked_energy_share(weights, k), 6) for k in ranks},
            "expert_energy": {str(k): round(expert_energy_share(weights, k), 6) for k in ranks},
        }
    return found


def checkpoint_redundancy(model: str, ranks=RANKS) -> dict:
    """The redundancy of every MoE layer of the checkpoint `model` (hub id or directory), and the means
    over layers and projections: {"layers": {index: layer_redundancy}, "mean": {...}}."""
    from kbvq_cli.experts import layer_experts
    from kbvq_cli.model_files import ModelSource

    source = ModelSource(model)
    layers = {}
    for index in range(source.num_layers):
        experts = layer_experts(source, index, torch.float64)
        if experts is not None and experts.num_experts >= 2:
            layers[str(index)] = layer_redundancy(experts.routed, ranks)
    source.release()
    entries = [entry for layer in layers.values() for entry in layer.values()]
    if not entries:
        return {"layers": {}, "mean": None}
    average = lambda values: round(sum(values) / len(values), 6)  # noqa: E731
    mean = {"similarity": average([e["similarity"] for e in entries]),
            **{kind: {str(k): average([e[kind][str(k)] for e in entries]) for k in ranks}
               for kind in ("stacked_energy", "expert_energy")}}
    return {"layers": layers, "mean": mean}
