"""Perplexity per METHOD.md §6: documents joined with "\n\n", tokenized once, cut into non-overlapping
windows of `seqlen` tokens (a shorter tail is dropped, as in the GPTQ/paper protocol), each window
scored on its own; perplexity = exp(mean next-token NLL over all scored tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kbvq_cli.errors import KbvqError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    mean_nll: float
    tokens_scored: int
    windows: int

    def to_json(self) -> dict:
        return {"ppl": self.ppl, "mean_nll": self.mean_nll, "tokens_scored": self.tokens_scored,
                "windows": self.windows}


def token_stream(documents: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """int64 [N]: the documents joined with a blank line, tokenized as one text (then cut to max_tokens)."""
    ids = tokenizer("\n\n".join(documents), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens else ids


def full_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of the stream; the tail shorter than seqlen is dropped."""
    count = ids.numel() // seqlen
    if count == 0:
        raise KbvqError(f"the perplexity text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"lower --seqlen or give more text with --ppl-data")
    return ids[: count * seqlen].view(count, seqlen)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of one window, float64. logits [T, V], window int64 [T]."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), window[1:], reduction="sum")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, device, progress=None) -> Perplexity:
    """Score every full window of `ids` with `model` (one window per forward pass)."""
    windows = full_windows(ids, seqlen)
    total = torch.zeros((), dtype=torch.float64)
    for window in windows:
        logits = model(input_ids=window.unsqueeze(0).to(device), use_cache=False).logits[0]
        total += window_nll(logits.float().cpu(), window).cpu()
        if progress is not None:
            progress()
    scored = windows.shape[0] * (seqlen - 1)
    mean = float(total) / scored
    return Perplexity(math.exp(mean), mean, scored, windows.shape[0])
