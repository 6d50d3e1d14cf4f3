"""Perplexity as the paper measures it (docs/method.md §6): the one definition behind `kbvq eval` and the
numbers the test-bed build records.

documents -> one token stream -> non-overlapping windows of `seqlen` tokens -> exp(mean next-token NLL)

- The documents are joined with a blank line and tokenized once, without special tokens, so windows
  cross document boundaries (the WikiText-2 protocol of GPTQ, which the paper follows).
- Each window is scored on its own: its first token is context only, so a window scores seqlen - 1
  predictions and no prediction sees more than seqlen - 1 tokens of context.
- The tail after the last full window is dropped, as that protocol does (`numel // seqlen` windows).
  Scoring it would mix in predictions made with less context than all the others and make the number
  depend on where the text happens to end; what is lost is under one window (at most 4095 of
  WikiText-2's ~300k tokens at seqlen 4096).
- Logits are taken in float32 whatever the model's dtype, and the NLL is summed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from kbvq_cli.errors import KbvqError


@dataclass(frozen=True)
class Perplexity:
    """exp(mean_nll) over `tokens_scored` = windows x (seqlen - 1) next-token predictions."""

    ppl: float
    mean_nll: float
    tokens_scored: int
    windows: int

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "mean_nll": self.mean_nll, "tokens_scored": self.tokens_scored,
                "windows": self.windows}


def token_stream(documents: Sequence[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """int64 [N]: the documents joined with a blank line, tokenized as one text (then cut to max_tokens)."""
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """int64 [n, seqlen]: the non-overlapping windows of the stream `ids` [N]; the tail shorter than
    seqlen is dropped (see the module docstring)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise KbvqError(f"the perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"use a shorter sequence length or more text")
    return ids[: count * seqlen].view(count, seqlen)


def summed_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """float64 []: next-token NLL summed over a batch of windows. logits [B, T, V], batch int64 [B, T]."""
    predicted = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    return torch.nn.functional.cross_entropy(predicted, batch[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, *, device: Any = "cpu", batch_size: int = 1,
               forward_options: dict | None = None, on_batch: Callable[[Any], None] | None = None) -> Perplexity:
    """Score every window of the stream `ids` (int64 [N]) with `model`, `batch_size` windows per forward.

    The model should be in eval mode. Batching changes only float32 rounding inside the model (about 1e-7
    relative on the result). `forward_options` are extra keyword arguments of the forward pass (e.g.
    output_router_logits=True); `on_batch` receives each forward's output (progress, expert counts).
    """
    cut = windows(ids, seqlen)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, cut.shape[0], batch_size):
        batch = cut[start:start + batch_size]
        output = model(input_ids=batch.to(device), use_cache=False, **(forward_options or {}))
        total += summed_nll(output.logits.float().cpu(), batch)
        if on_batch is not None:
            on_batch(output)
    scored = cut.shape[0] * (seqlen - 1)
    mean = float(total) / scored
    return Perplexity(math.exp(mean), mean, scored, cut.shape[0])
