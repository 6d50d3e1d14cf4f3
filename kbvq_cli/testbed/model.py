"""The two test-bed variants: architecture, corpus budget and training schedule, all in one frozen record.

Both are transformers' `Qwen2MoeForCausalLM` (Qwen1.5-MoE's architecture): every layer is sparse, with
8 routed experts of which each token uses 2 (`norm_topk_prob=False`, as Qwen1.5-MoE), plus one
always-on shared expert behind a sigmoid gate; untied input and output embeddings; weights saved in
float32.

full: hidden 256, 4 layers, 4 heads of 64, expert intermediate 128, shared expert 256, vocabulary
      8192, sequence 256. 1000 AdamW steps of 16 sequences = 4.1M tokens (about 1.5 passes over the
      2.75M-token training split), 2 torch threads: about 11 minutes on 2 free cores (~6k tokens/s).
mini: hidden 128, 2 layers, 4 heads of 32, expert intermediate 64, shared expert 128, vocabulary
      2048, sequence 128. 240 steps of 32 sequences = 1M tokens of a 2.5 MB slice of the training
      split; splits thinned to about 100 kB each (~33k tokens). 1 torch thread: matrices this small
      gain little from a second one, and a single thread keeps its speed (~20k tokens/s, about a
      minute in all) on cores shared with other jobs, where two contending threads can run 5x slower.
      It exists for the end-to-end tests in CI; its perplexity is high and that is fine.

The bytes of a build are reproducible for the same seed, libraries, CPU kind and thread count, on any
number of cores: $KBVQ_THREADS overrides the thread count (and then the bytes differ from the default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from kbvq_cli.errors import KbvqError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Variant:
    """Everything that decides a test-bed's bytes (besides the corpus archives and library versions)."""

    name: str
    # architecture
    hidden_size: int
    num_layers: int
    num_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    vocab_size: int
    seq_len: int
    num_experts: int = 8
    experts_per_token: int = 2
    # corpus: block size of the split, and character budgets (None: the whole split)
    block_chars: int = 4000
    train_chars: int | None = None
    heldout_chars: int | None = None
    # training
    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_coef: float = 0.01
    eval_batch_size: int = 16
    # torch threads for training and evaluation. Part of the recipe because the bytes depend on it:
    # the expert and norm weight gradients are reductions over tokens that torch splits by thread.
    threads: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


VARIANTS: dict[str, Variant] = {
    "full": Variant(
        name="full", hidden_size=256, num_layers=4, num_heads=4, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, vocab_size=8192, seq_len=256,
        steps=1000, batch_size=16, peak_lr=2e-3, warmup_steps=50, threads=2,
    ),
    "mini": Variant(
        name="mini", hidden_size=128, num_layers=2, num_heads=4, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, vocab_size=2048, seq_len=128,
        train_chars=3_000_000, heldout_chars=100_000,
        steps=240, batch_size=32, peak_lr=3e-3, warmup_steps=20, threads=1,
    ),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KbvqError(f"unknown test-bed variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def model_config(variant: Variant, eos_token_id: int) -> "PretrainedConfig":
    """The `Qwen2MoeConfig` of a variant; `max_position_embeddings` is the training sequence length."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=variant.vocab_size,
        hidden_size=variant.hidden_size,
        # Only used by dense layers, which this model has none of (decoder_sparse_step=1).
        intermediate_size=2 * variant.hidden_size,
        num_hidden_layers=variant.num_layers,
        num_attention_heads=variant.num_heads,
        num_key_value_heads=variant.num_heads,
        num_experts=variant.num_experts,
        num_experts_per_tok=variant.experts_per_token,
        moe_intermediate_size=variant.moe_intermediate_size,
        shared_expert_intermediate_size=variant.shared_expert_intermediate_size,
        decoder_sparse_step=1,
        max_position_embeddings=variant.seq_len,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        bos_token_id=None,
    )


def new_model(variant: Variant, eos_token_id: int):
    """A freshly initialised float32 model (seeded by `variant.seed`), experts as grouped_mm.

    grouped_mm (transformers' fused expert kernel, torch's `grouped_mm` on CPU) is the fastest CPU
    path measured here (eager or grouped, under bf16 autocast on an AVX512 machine: ~1.3x eager).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(variant.seed)
    return AutoModelForCausalLM.from_config(
        model_config(variant, eos_token_id), experts_implementation="grouped_mm", dtype=torch.float32,
    )
