"""Where things are in each supported architecture: data, one record per `model_type`.

In memory (transformers 5) routed experts are fused 3D parameters, `experts.gate_up_proj [E, 2I, H]`
(gate rows first, then up) and `experts.down_proj [E, H, I]`; on disk `save_pretrained` writes one
2D tensor per expert and projection, under names that differ per family (Mixtral: w1/w3/w2 under
`block_sparse_moe`). The adapter records both, so layers can be streamed from safetensors files
without instantiating the whole model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from kbvq_cli.errors import KbvqError


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    modeling_module: str  # transformers module holding the classes below
    decoder_layer_class: str
    rotary_class: str
    norm_class: str
    num_experts_key: str  # config attribute with the number of routed experts
    shared_experts: tuple[str, ...] = ()  # module paths inside a decoder layer, e.g. "mlp.shared_expert"
    disk_moe_block: str = "mlp"  # name of the MoE block on disk ("block_sparse_moe" for Mixtral)
    disk_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    sliding_window_from_config: bool = False  # Mixtral: config.sliding_window selects the sliding mask
    moe_block: str = "mlp"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    layers_prefix: str = "model.layers"
    embed_tokens: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def module(self):
        return importlib.import_module(self.modeling_module)

    def cls(self, name: str):
        return getattr(self.module(), name)


ADAPTERS: dict[str, ArchAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        ArchAdapter(
            model_type="qwen2_moe",
            modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe",
            decoder_layer_class="Qwen2MoeDecoderLayer",
            rotary_class="Qwen2MoeRotaryEmbedding",
            norm_class="Qwen2MoeRMSNorm",
            num_experts_key="num_experts",
            shared_experts=("mlp.shared_expert",),
        ),
        ArchAdapter(
            model_type="qwen3_moe",
            modeling_module="transformers.models.qwen3_moe.modeling_qwen3_moe",
            decoder_layer_class="Qwen3MoeDecoderLayer",
            rotary_class="Qwen3MoeRotaryEmbedding",
            norm_class="Qwen3MoeRMSNorm",
            num_experts_key="num_experts",
        ),
        ArchAdapter(
            model_type="mixtral",
            modeling_module="transformers.models.mixtral.modeling_mixtral",
            decoder_layer_class="MixtralDecoderLayer",
            rotary_class="MixtralRotaryEmbedding",
            norm_class="MixtralRMSNorm",
            num_experts_key="num_local_experts",
            disk_moe_block="block_sparse_moe",
            disk_expert_names=("w1", "w3", "w2"),
            sliding_window_from_config=True,
        ),
        ArchAdapter(
            model_type="deepseek_v2",
            modeling_module="transformers.models.deepseek_v2.modeling_deepseek_v2",
            decoder_layer_class="DeepseekV2DecoderLayer",
            rotary_class="DeepseekV2RotaryEmbedding",
            norm_class="DeepseekV2RMSNorm",
            num_experts_key="n_routed_experts",
            shared_experts=("mlp.shared_experts",),
        ),
        ArchAdapter(
            model_type="olmoe",
            modeling_module="transformers.models.olmoe.modeling_olmoe",
            decoder_layer_class="OlmoeDecoderLayer",
            rotary_class="OlmoeRotaryEmbedding",
            norm_class="OlmoeRMSNorm",
            num_experts_key="num_experts",
        ),
    )
}


def adapter_for(model_type: str | None) -> ArchAdapter:
    if model_type not in ADAPTERS:
        raise KbvqError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
