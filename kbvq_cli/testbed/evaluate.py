"""The test-bed's held-out numbers: perplexity (kbvq_cli.perplexity, the definition `kbvq eval` uses,
so the perplexities testbed.json records are what `kbvq eval` measures on the same split and window
length) and, per layer, how the router shares the top-k slots among the experts. float32, no autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kbvq_cli.perplexity import perplexity

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


def _count_routing(router_logits, top_k: int, counts: "torch.Tensor") -> None:
    """Add each layer's top-k choices into counts [n_layers, n_experts]."""
    import torch

    for layer, logits in enumerate(router_logits):
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices.reshape(-1)
        counts[layer].index_add_(0, chosen, torch.ones(chosen.numel()))


def evaluate(model, token_ids: "torch.Tensor", seq_len: int, batch_size: int = 16) -> Evaluation:
    """Score `token_ids` (int64 [n_tokens]) in windows of `seq_len`, `batch_size` windows per forward."""
    import torch

    config = model.config
    counts = torch.zeros(config.num_hidden_layers, config.num_experts)

    def count(output) -> None:
        _count_routing(output.router_logits, config.num_experts_per_tok, counts)

    model.eval()
    measured = perplexity(model, token_ids, seq_len, batch_size=batch_size,
                          forward_options={"output_router_logits": True}, on_batch=count)
    shares = (counts / counts.sum(dim=1, keepdim=True)).tolist()
    return Evaluation(perplexity=measured.ppl, mean_nll=measured.mean_nll, tokens_scored=measured.tokens_scored,
                      expert_share=shares)
