"""Perplexity and expert load of a model on a token stream: deterministic, float32, no autocast.

The stream is cut into non-overlapping windows of the model's sequence length (the last, shorter
window included); each window is scored on its own, so the first token of a window is never
predicted. Perplexity = exp(mean next-token NLL over every scored token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Evaluation:
    """Perplexity over `tokens_scored` predictions, and per layer the share of top-k slots each expert got."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    expert_share: list[list[float]]

    def to_json(self) -> dict:
        return {
            "perplexity": round(self.perplexity, 4),
            "mean_nll": round(self.mean_nll, 6),
            "tokens_scored": self.tokens_scored,
            "expert_share": [[round(share, 4) for share in layer] for layer in self.expert_share],
        }


def windows(token_ids: "torch.Tensor", seq_len: int) -> list["torch.Tensor"]:
    """Non-overlapping windows int64 [seq_len] of the stream, then the remainder if it has ≥ 2 tokens."""
    full = token_ids.numel() // seq_len
    cut = list(token_ids[: full * seq_len].view(full, seq_len)) if full else []
    remainder = token_ids[full * seq_len:]
    return cut + ([remainder] if remainder.numel() >= 2 else [])


def _count_routing(router_logits, top_k: int, counts: "torch.Tensor") -> None:
    """Add each layer's top-k choices into counts [n_layers, n_experts]."""
    import torch

    for layer, logits in enumerate(router_logits):
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices.reshape(-1)
        counts[layer].index_add_(0, chosen, torch.ones(chosen.numel()))


def evaluate(model, token_ids: "torch.Tensor", seq_len: int, batch_size: int = 16) -> Evaluation:
    """Score `token_ids` (int64 [n_tokens]) in windows of `seq_len`, batched by equal window length."""
    import torch
    import torch.nn.functional as F

    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_experts)
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    all_windows = windows(token_ids, seq_len)
    batches = [all_windows[i:i + batch_size] for i in range(0, len(all_windows), batch_size)]
    model.eval()
    with torch.no_grad():
        for batch in batches:
            # Windows in a batch share a length except a lone remainder: score it as its own batch.
            for group in ([batch] if len({w.numel() for w in batch}) == 1 else [batch[:-1], batch[-1:]]):
                inputs = torch.stack(group)
                output = model(input_ids=inputs, output_router_logits=True, use_cache=False)
                logits = output.logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs[:, 1:].reshape(-1), reduction="sum")
                total_nll += nll.double()
                scored += inputs[:, 1:].numel()
                _count_routing(output.router_logits, config.num_experts_per_tok, counts)
    if scored == 0:
        raise ValueError("need at least 2 tokens to measure perplexity")
    mean_nll = (total_nll / scored).item()
    shares = (counts / counts.sum(dim=1, keepdim=True)).tolist()
    return Evaluation(perplexity=math.exp(mean_nll), mean_nll=mean_nll, tokens_scored=scored, expert_share=shares)
