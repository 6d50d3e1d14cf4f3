"""The real dimensions of the paper's four models (their published config.json), for tests that reason
about sizes and for `benchmarks/bench_scale.py`, which builds one-layer random checkpoints of them.

Only shapes and the architecture's switches are here; `paper_config(name)` makes a real transformers
config from them, and `layers=`/`vocab_size=` cut a model down while keeping every matrix's shape.
"""

from __future__ import annotations

PAPER_MODELS = {
    "qwen15-moe": ("qwen2_moe", dict(  # Qwen/Qwen1.5-MoE-A2.7B
        hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, max_position_embeddings=8192,
        norm_topk_prob=False, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(  # Qwen/Qwen3-30B-A3B
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True,
        tie_word_embeddings=False)),
    "mixtral-8x7b": ("mixtral", dict(  # mistralai/Mixtral-8x7B-v0.1
        hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=32768, tie_word_embeddings=False)),
    "deepseek-v2-lite": ("deepseek_v2", dict(  # deepseek-ai/DeepSeek-V2-Lite
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=102400, n_group=1,
        topk_group=1, max_position_embeddings=163840, tie_word_embeddings=False)),
}


def paper_config(name: str, **overrides):
    """A transformers config of paper model `name` (a key of PAPER_MODELS), with `overrides` applied."""
    from transformers import AutoConfig

    model_type, kwargs = PAPER_MODELS[name]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def parameter_count(config) -> int:
    """Parameters of the model `config` describes, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
