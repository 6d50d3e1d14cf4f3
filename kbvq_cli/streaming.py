"""Run a model one decoder layer at a time through transformers' own layer classes.

The model's forward is reproduced with its own parts: embedding lookup, the rotary embedding class,
`create_causal_mask` / `create_sliding_window_causal_mask`, and each `<Arch>DecoderLayer` built on the
meta device and filled with that layer's tensors from disk. Peak memory is one layer plus the
activations, whatever the model's size.
"""

from __future__ import annotations

import copy

import torch

from kbvq_cli.model_files import ModelSource


def pick_device(requested: str) -> str:
    """'auto' means CUDA when present, else CPU (our users run on one GPU, CI on CPU)."""
    from kbvq_cli.errors import KbvqError

    from kbvq_cli.distributed import local_device

    if requested == "auto":
        return local_device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise KbvqError(f"--device {requested} asked for, but no CUDA device is visible; use --device cpu")
    return local_device(requested)  # under torchrun `cuda` is this rank's own GPU


class LayerStreamer:
    """Builds the pieces of `source`'s model needed to push hidden states through layer after layer."""

    def __init__(self, source: ModelSource, device: str, dtype: torch.dtype = torch.float32):
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        config = copy.deepcopy(source.config)
        # sdpa is exact and memory-lean; the eager experts loop is the reference implementation
        config._attn_implementation = "sdpa"
        config._experts_implementation = "eager"
        self.config = config
        self.adapter = source.adapter
        self._rotary = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] int64 -> hidden [B, S, H] in `dtype`, on the CPU."""
        weight = self.source.tensor(self.adapter.embed_tokens)
        hidden = torch.nn.functional.embedding(input_ids.cpu(), weight).to(self.dtype)
        self.source.release()
        return hidden

    def build_layer(self, index: int) -> torch.nn.Module:
        layer_class = self.adapter.cls(self.adapter.decoder_layer_class)
        with torch.device("meta"):
            layer = layer_class(self.config, index)
        # experts fused straight into the compute dtype: no second full copy of them in the checkpoint's
        state = {name: tensor.to(device=self.device, dtype=self.dtype)
                 for name, tensor in self.source.layer_state_dict(index, expert_dtype=self.dtype).items()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    def is_moe_layer(self, layer: torch.nn.Module) -> bool:
        return module_at(layer, self.adapter.experts) is not None

    def layer_kwargs(self, index: int, hidden: torch.Tensor) -> dict:
        """attention mask, position ids and rotary embeddings for a batch `hidden` [B, S, H] on device."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        batch, seqlen, _ = hidden.shape
        position_ids = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
        mask_args = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids)
        mask_args[_CACHE_ARGUMENT] = None
        sliding = self._layer_is_sliding(index)
        mask = create_sliding_window_causal_mask(**mask_args) if sliding else create_causal_mask(**mask_args)
        if self._rotary is None:
            rotary_class = self.adapter.cls(self.adapter.rotary_class)
            self._rotary = rotary_class(config=self.config).to(self.device)
        position_embeddings = self._rotary(hidden, position_ids)
        return dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)

    def _layer_is_sliding(self, index: int) -> bool:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index] == "sliding_attention"
        return self.adapter.sliding_window_from_config and getattr(self.config, "sliding_window", None) is not None


def _cache_argument_name() -> str:
    """transformers 5.2x renamed the masks' `past_key_values` argument to `cache`; accept both."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


_CACHE_ARGUMENT = _cache_argument_name()


def module_at(root: torch.nn.Module, path: str):
    """The submodule at a dotted path, or None."""
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module
