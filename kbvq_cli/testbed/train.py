"""Training: a fixed number of AdamW steps on shuffled fixed-length sequences, seeded; bf16 autocast
where the CPU multiplies bf16 natively, float32 elsewhere (`training_autocast`).

A fixed step count rather than a wall-clock budget, so the weights depend only on the seed, the data
and the software, never on how fast the machine was. `torch.use_deterministic_algorithms` is on
while training so an op without a deterministic CPU kernel fails loudly instead of drifting.

The load-balancing loss is computed per layer and averaged. transformers' built-in one pools the
tokens of all layers before measuring balance, so one layer can starve an expert while the others
make up for it (in a trial here one layer's expert fell to 0% of tokens); per layer, every layer is
pushed towards balance on its own.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from kbvq_cli.testbed.model import Variant

if TYPE_CHECKING:
    import torch

LOG_EVERY = 50


def training_autocast() -> str:
    """`bf16` where torch's CPU matmuls have a fast bf16 path (oneDNN, AVX512 and up), else `none` (float32).

    Without it torch falls back to a scalar bf16 GEMM: on this project's AVX2 machine one step of the full
    test-bed took about 40 s under bf16 autocast against 1.8 s in float32 (`py-spy` put most of it in
    `cpublas::gemm_transa_<BFloat16>`), which made a 15-minute build an 11-hour one. The choice decides
    the weights, so it is part of the build key and recorded in the manifest.
    """
    import torch

    fast = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and torch.backends.mkldnn.is_available()
    return "bf16" if fast else "none"


@dataclass
class TrainingSummary:
    """What the manifest records about training: loss curve (every LOG_EVERY steps), speed, totals."""

    steps: int
    tokens: int
    seconds: float
    final_loss: float
    loss_curve: dict[int, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def training_sequences(token_ids: "torch.Tensor", seq_len: int) -> "torch.Tensor":
    """Cut a token stream int64 [n_tokens] into non-overlapping rows: int64 [n_tokens // seq_len, seq_len]."""
    usable = (token_ids.numel() // seq_len) * seq_len
    if usable == 0:
        raise ValueError(f"need at least {seq_len} training tokens, got {token_ids.numel()}")
    return token_ids[:usable].view(-1, seq_len)


def batch_indices(n_sequences: int, batch_size: int, steps: int, seed: int) -> Iterator["torch.Tensor"]:
    """Row indices int64 [batch_size] for each step: a fresh seeded permutation per pass over the data."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n_sequences, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def per_layer_balance_loss(router_logits: tuple["torch.Tensor", ...], top_k: int) -> "torch.Tensor":
    """Switch-Transformer balance loss of each layer, averaged over layers; 1.0 when perfectly balanced.

    router_logits: one float [n_tokens, n_experts] per layer. For a layer,
    loss = n_experts * sum_e (share of top-k slots given to e) * (mean router probability of e).
    """
    import torch

    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n_tokens, n_experts = probs.shape
        chosen = torch.topk(probs, top_k, dim=-1).indices
        slot_share = torch.zeros(n_experts).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
        slot_share = slot_share / (n_tokens * top_k)
        losses.append(n_experts * torch.sum(slot_share * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def learning_rate(step: int, variant: Variant) -> float:
    """Linear warmup to `peak_lr`, then cosine decay to `min_lr_ratio * peak_lr` at the last step."""
    if step < variant.warmup_steps:
        return variant.peak_lr * (step + 1) / variant.warmup_steps
    progress = (step - variant.warmup_steps) / max(1, variant.steps - variant.warmup_steps - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return variant.peak_lr * (variant.min_lr_ratio + (1.0 - variant.min_lr_ratio) * cosine)


def make_optimizer(model, variant: Variant) -> "torch.optim.Optimizer":
    """AdamW; matrices (and the 3-D expert stacks) decay, norms and biases do not."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": variant.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=variant.peak_lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def training_step(model, batch: "torch.Tensor", variant: Variant) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Forward under `training_autocast()`; returns (next-token cross-entropy, per-layer balance loss).

    batch: int64 [batch_size, seq_len]. The cross-entropy is computed here rather than by passing
    labels, because with router logits on, the model would add its own pooled balance loss.
    """
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training_autocast() == "bf16"):
        output = model(input_ids=batch, output_router_logits=True, use_cache=False)
    logits = output.logits[:, :-1].float()
    lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return lm_loss, per_layer_balance_loss(output.router_logits, variant.experts_per_token)


def train_model(model, sequences: "torch.Tensor", variant: Variant,
                on_step: Callable[[int, float, float], None] = lambda steps_done, loss, balance: None
                ) -> TrainingSummary:
    """Train `model` in place for `variant.steps` steps on rows of `sequences` (int64 [n, seq_len]).

    `on_step(steps_done, loss, balance)` is called after every step with the mean loss of the last
    LOG_EVERY steps (one step's loss jumps with its batch) and the step's balance loss: what a progress
    display shows.
    """
    import torch

    optimizer = make_optimizer(model, variant)
    model.train()
    curve: dict[int, float] = {}
    recent: list[float] = []
    start = time.perf_counter()
    with deterministic_algorithms():
        batches = batch_indices(sequences.shape[0], variant.batch_size, variant.steps, variant.seed + 1)
        for step, rows in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, variant)
            lm_loss, balance_loss = training_step(model, sequences[rows], variant)
            (lm_loss + variant.balance_coef * balance_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), variant.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recent = (recent + [lm_loss.item()])[-LOG_EVERY:]
            if (step + 1) % LOG_EVERY == 0 or step + 1 == variant.steps:
                curve[step + 1] = round(sum(recent) / len(recent), 4)
            on_step(step + 1, sum(recent) / len(recent), balance_loss.item())
    model.eval()
    return TrainingSummary(steps=variant.steps, tokens=variant.steps * variant.tokens_per_step,
                           seconds=time.perf_counter() - start, final_loss=curve[variant.steps], loss_curve=curve)
