"""Tiny random-weight models of every supported architecture, built from real transformers configs.

Each is saved with `save_pretrained` (per-expert names on disk) together with a small byte-level BPE
tokenizer trained on seeded synthetic text, so the whole CLI runs on them offline.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the of and to in is was for that with as on by at from his her this which or an are be had not but "
    "have it they were one all their been has more when there who will would can if its so no into than "
    "time only new some could these two may first then do any like my now over such our man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three expert router token layer weight matrix vector codebook"
).split()

VOCAB_SIZE = 320

CONFIGS = {
    "qwen2_moe": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
    "qwen3_moe": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
    "mixtral": dict(
        hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    ),
    "deepseek_v2": dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, n_group=1, topk_group=1,
    ),
    "olmoe": dict(
        hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    ),
}


def synthetic_text(n_sentences: int, seed: int) -> str:
    """Seeded pseudo-English: sentences of 5-14 words from a fixed list."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6))


def build_tokenizer(directory: Path, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([synthetic_text(400, seed)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return fast


def build_tiny_model(model_type: str, directory: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random-weight `model_type` model plus tokenizer to `directory`; returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, seed)
    kwargs = {**CONFIGS[model_type], "vocab_size": VOCAB_SIZE, **overrides}
    kwargs.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # Random routers give near-uniform routing; scale them up so routing is decisive and uneven, like a
    # trained model's, which exercises the per-expert bookkeeping.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.mul_(20.0)
    model.save_pretrained(str(directory))
    return directory


def write_text(path: Path, n_sentences: int = 600, seed: int = 1) -> Path:
    path.write_text(synthetic_text(n_sentences, seed))
    return path
