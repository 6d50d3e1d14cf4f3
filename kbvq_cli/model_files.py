"""A model's files on disk: where they are, what they hash to, and one decoder layer's tensors at a time.

Nothing here materialises the whole model: tensors are read from the safetensors files by name
(memory-mapped), so a 90 GB checkpoint costs one layer of memory.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from kbvq_cli.adapters import ArchAdapter, adapter_for
from kbvq_cli.errors import KbvqError
from kbvq_cli.finite import count_non_finite

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]


def resolve_model_path(model: str) -> Path:
    """A local model directory as given, or a Hugging Face id fetched (config, tokenizer, safetensors)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise KbvqError(f"model {model!r} is not a directory; pass a Hugging Face model directory or hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # the hub client raises many types; all mean "could not fetch"
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise KbvqError(
            f"could not fetch model {model!r} from the Hugging Face hub ({reason}); "
            f"pass a local model directory instead"
        ) from None


def safetensors_header(path: Path) -> dict[str, dict]:
    """Name -> {dtype, shape, data_offsets} of every tensor in a safetensors file, from its header alone."""
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def load_tokenizer(path: Path):
    """The tokenizer of a model directory (original or packed), or a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises several types for a missing or broken tokenizer
        raise KbvqError(f"cannot load the tokenizer of {path} ({type(error).__name__}); "
                        f"the model directory needs its tokenizer files") from None


def _weight_map(path: Path) -> dict[str, str]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise KbvqError(
            f"no safetensors weights in {path}; kbvq streams safetensors checkpoints "
            f"(re-save the model with save_pretrained)"
        )
    from safetensors import safe_open

    mapping = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            mapping.update({name: file.name for name in handle.keys()})
    return mapping


class ModelSource:
    """A checkpoint on disk, read tensor by tensor. `model` is a local directory or a hub id."""

    def __init__(self, model: str):
        from transformers import AutoConfig

        self.name = model
        self.path = resolve_model_path(model)
        if not (self.path / "config.json").exists():
            raise KbvqError(f"{self.path} has no config.json; pass a Hugging Face model directory")
        try:
            model_type = json.loads((self.path / "config.json").read_text()).get("model_type")
        except ValueError:
            raise KbvqError(f"{self.path / 'config.json'} is not valid JSON; re-download the model") from None
        self.adapter: ArchAdapter = adapter_for(model_type)
        try:
            self.config = AutoConfig.from_pretrained(str(self.path))
        except Exception as error:  # transformers validates configs with several exception types
            reason = str(error).splitlines()[-1][:160]
            raise KbvqError(f"cannot read the config of {self.path} ({reason}); fix config.json") from None
        self.weight_map = _weight_map(self.path)
        self._handles: dict[str, object] = {}

    # ---------------------------------------------------------------- shape facts
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.adapter.num_experts_key))

    @cached_property
    def layer_tensor_names(self) -> dict[int, list[str]]:
        pattern = re.compile(re.escape(self.adapter.layers_prefix) + r"\.(\d+)\.")
        layers: dict[int, list[str]] = {}
        for name in self.weight_map:
            match = pattern.match(name)
            if match:
                layers.setdefault(int(match.group(1)), []).append(name)
        return layers

    @cached_property
    def tensor_sizes(self) -> dict[str, int]:
        """Name -> element count of every tensor, from the safetensors headers alone (work estimates)."""
        sizes = {}
        for file in sorted(set(self.weight_map.values())):
            for name, entry in safetensors_header(self.path / file).items():
                count = 1
                for size in entry["shape"]:
                    count *= size
                sizes[name] = count
        return sizes

    def stored_totals(self) -> tuple[int, int]:
        """(parameters, bytes of tensor data) in the checkpoint's safetensors files, from their headers."""
        parameters = data = 0
        for file in sorted(set(self.weight_map.values())):
            for entry in safetensors_header(self.path / file).values():
                count = 1
                for size in entry["shape"]:
                    count *= size
                start, end = entry["data_offsets"]
                parameters, data = parameters + count, data + end - start
        return parameters, data

    # ---------------------------------------------------------------- reading
    def tensor(self, name: str):
        if name not in self.weight_map:
            raise KbvqError(f"tensor {name} is missing from {self.path}; the checkpoint is incomplete")
        file = self.weight_map[name]
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(self.path / file), "pt")
            except Exception as error:
                raise KbvqError(f"cannot read {self.path / file} ({error}); re-download the model") from None
        tensor = self._handles[file].get_tensor(name)
        bad = count_non_finite(tensor)  # every stage reads weights here: a NaN is stopped where it enters
        if bad:
            raise KbvqError(f"tensor {name} in {self.path / file} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                            f"the checkpoint is damaged: re-download it, or re-save it from finite weights")
        return tensor

    def layer_state_dict(self, index: int, expert_dtype=None) -> dict:
        """Tensors of decoder layer `index`, renamed and fused to the in-memory layout of transformers 5;
        the fused experts in `expert_dtype` when given (converted expert by expert while fusing, so a
        float32 copy of a layer's experts costs no second full copy in the checkpoint's dtype)."""
        prefix = f"{self.adapter.layers_prefix}.{index}."
        names = self.layer_tensor_names.get(index)
        if not names:
            raise KbvqError(f"layer {index} is missing from {self.path}; the checkpoint is incomplete")
        tensors = {name[len(prefix):]: self.tensor(name) for name in names}
        self.release()
        return fuse_experts(self.adapter, tensors, self.num_experts, expert_dtype)

    def release(self) -> None:
        """Unmap the files: pages read through a mapping stay resident (and count in RSS) until then."""
        self._handles.clear()

    def tokenizer(self):
        return load_tokenizer(self.path)

    def fingerprint(self) -> dict:
        """sha256 of config, tokenizer and weight files (weights cached by path, size and mtime)."""
        from kbvq_cli.hashing import FileHashCache

        cache = FileHashCache()
        files = sorted({*self.weight_map.values(), "config.json"})
        files += sorted(p.name for p in self.path.glob("tokenizer*"))
        return {"model_type": self.config.model_type,
                "files": {name: cache.sha256(self.path / name) for name in files}}


def fuse_experts(adapter: ArchAdapter, tensors: dict, num_experts: int, dtype=None) -> dict:
    """Map one layer's on-disk names to memory names; stack per-expert 2D weights into fused 3D ones
    (in `dtype`, default the weights' own). Takes the tensors out of `tensors` as it goes: each expert's
    weights are freed once copied, so fusing costs about one expert of extra memory, not a layer."""
    import torch

    disk_block, block = adapter.disk_moe_block + ".", adapter.moe_block + "."
    expert_pattern = re.compile(re.escape(adapter.experts) + r"\.(\d+)\.(\w+)\.weight$")
    out, per_expert = {}, {}
    for name in list(tensors):
        tensor = tensors.pop(name)
        if name.startswith(disk_block) and disk_block != block:
            name = block + name[len(disk_block):]
        match = expert_pattern.match(name)
        if match:
            per_expert[(int(match.group(1)), match.group(2))] = tensor
        else:
            out[name] = tensor
    if not per_expert:
        return out
    gate, up, down = adapter.disk_expert_names
    try:
        first_gate, first_down = per_expert[(0, gate)], per_expert[(0, down)]
        dtype = dtype or first_gate.dtype
        gate_up = torch.empty(num_experts, 2 * first_gate.shape[0], first_gate.shape[1], dtype=dtype)
        down_proj = torch.empty(num_experts, *first_down.shape, dtype=dtype)
        half = first_gate.shape[0]
        for e in range(num_experts):
            gate_up[e, :half] = per_expert.pop((e, gate))
            gate_up[e, half:] = per_expert.pop((e, up))
            down_proj[e] = per_expert.pop((e, down))
    except KeyError as missing:
        raise KbvqError(f"expert weight {missing.args[0]} is missing from the checkpoint; it is incomplete") from None
    out[f"{adapter.experts}.gate_up_proj"] = gate_up
    out[f"{adapter.experts}.down_proj"] = down_proj
    return out
