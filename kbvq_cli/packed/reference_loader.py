"""Build a pack's reference model (`kbvq_cli.packed.reference`): every projection dequantized whole per expert.

    from kbvq_cli.packed.reference_loader import load_reference
    model = load_reference("runs/qwen15-moe-w2/pack")  # what `load_quantized` must compute, slowly

The model is built on the meta device from `config.json`; every unquantized tensor is assigned from
the shards, and each MoE layer's routed experts (and shared expert's linears) are replaced by the
reference modules, indices widened to int32 and every part cast to the compute dtype. Tests compare the
kernel-backed model against it; `kbvq pack --dense` folds its dense weights into a plain checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.packed.bitpack import unpack_indices
from kbvq_cli.packed.integrity import pack_directory
from kbvq_cli.packed.layout import NONEXPERT_PARTS, routed_prefix, shared_prefix
from kbvq_cli.packed.reference import ScalarProjection, VqExperts, VqLinear, VqProjection
from kbvq_cli.packed.schema import SCALAR, PackedUnitMeta
from kbvq_cli.packed.storage import category


def _expert_dim(routed: bool):
    """Routed tensors carry an expert dim; a shared expert's or a non-expert linear's are given one."""
    return (lambda t: t) if routed else (lambda t: None if t is None else t.unsqueeze(0))


def _unpacked(packed: torch.Tensor, width: int, count: int, routed: bool) -> torch.Tensor:
    """Bit-packed rows (one per expert) -> int64 [n, count]."""
    return torch.stack([unpack_indices(row, width, count) for row in _expert_dim(routed)(packed)])


def build_projection(tensors: dict, prefix: str, shape, side: str, width: int, dtype, basis=None) -> VqProjection:
    """One projection's module from a packed unit. `basis` supplies the routed shared_basis to a stacked
    shared expert."""
    oc, ic = shape
    routed = tensors[prefix + "codebook"].dim() == 3
    expand = _expert_dim(routed)
    codebook = expand(tensors[prefix + "codebook"])
    dim = codebook.shape[-1]
    indices = _unpacked(tensors[prefix + "indices"], width, oc * ic // dim, routed).to(torch.int32)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    shared_basis = tensors.get(prefix + "shared_basis", basis)
    coeffs = tensors.get(prefix + "expert_coeffs")
    return VqProjection(indices.reshape(-1, oc, ic // dim), cast(codebook),
                        cast(expand(tensors.get(prefix + "scale"))), cast(expand(tensors.get(prefix + "shift"))),
                        cast(shared_basis if coeffs is not None else None), cast(expand(coeffs)), side)


def build_scalar_projection(get, shape, bits: int, group_size: int, dtype) -> ScalarProjection:
    """An RTN/GPTQ matrix's module from a packed unit; `get(part)` returns the tensor of part `codes`,
    `qscale`, `qzero` or `group_index` (None if absent)."""
    oc, ic = shape
    routed = get("qscale").dim() == 3
    expand = _expert_dim(routed)
    codes = _unpacked(get("codes"), bits, oc * ic, routed).to(torch.uint8).reshape(-1, oc, ic)
    return ScalarProjection(codes, expand(get("qscale")), expand(get("qzero")), group_size, expand(get("group_index")),
                            dtype)


def _side(meta: PackedUnitMeta, name: str) -> str:
    return meta.parts[name].side if name in meta.parts else "input"


def layer_projections(tensors: dict, meta: PackedUnitMeta, adapter, index: int, dtype) -> tuple[dict, dict]:
    """(routed {projection: module}, shared {projection: module}) of one packed MoE layer."""
    shared_path = meta.shared_path
    if meta.format == SCALAR:
        build = lambda prefix, key: build_scalar_projection(  # noqa: E731
            lambda part: tensors.get(prefix + part), meta.shapes[key], meta.bits, meta.group_size, dtype)
        routed = {p: build(routed_prefix(adapter.layers_prefix, adapter.experts, index, p), p) for p in PROJECTIONS}
        shared = {} if shared_path is None else {
            p: build(shared_prefix(adapter.layers_prefix, shared_path, index, p), f"shared.{p}") for p in PROJECTIONS}
        return routed, shared

    routed, shared = {}, {}
    for projection in PROJECTIONS:
        width = meta.projection_width(projection)
        prefix = routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
        side = _side(meta, projection)
        routed[projection] = build_projection(tensors, prefix, meta.shapes[projection], side, width, dtype)
        if shared_path is not None:
            prefix = shared_prefix(adapter.layers_prefix, shared_path, index, projection)
            stacked = meta.shared_stacked.get(projection, False)
            basis = tensors.get(routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
                                + "shared_basis") if stacked else None
            own_side = _side(meta, f"shared.{projection}")
            shared[projection] = build_projection(tensors, prefix, meta.shapes[f"shared.{projection}"],
                                                  side if stacked else own_side, width, dtype, basis)
    return routed, shared


def _install_layer(model, adapter, index: int, tensors: dict, meta: PackedUnitMeta, dtype) -> None:
    from kbvq_cli.streaming import module_at

    layer = module_at(model, f"{adapter.layers_prefix}.{index}")
    routed, shared = layer_projections(tensors, meta, adapter, index, dtype)
    experts_parent, _, experts_name = adapter.experts.rpartition(".")
    original = module_at(layer, adapter.experts)
    replacement = VqExperts(routed["gate"], routed["up"], routed["down"], original.act_fn,
                            routed["gate"].num_experts)
    setattr(module_at(layer, experts_parent), experts_name, replacement)
    if shared:
        shared_module = module_at(layer, meta.shared_path)
        for projection, module in shared.items():
            oc, ic = meta.shapes[f"shared.{projection}"]
            setattr(shared_module, f"{projection}_proj", VqLinear(module, ic, oc))


def _install_nonexpert(model, adapter, index: int, tensors: dict, meta: PackedUnitMeta, dtype) -> None:
    """Replace each quantized non-expert linear of the layer by a module computing it from its codes."""
    from kbvq_cli.streaming import module_at

    layer = module_at(model, f"{adapter.layers_prefix}.{index}")
    prefix = f"{adapter.layers_prefix}.{index}."
    for path, linear in meta.nonexpert.items():
        oc, ic = linear.shape
        projection = build_scalar_projection(lambda part: tensors.get(f"{prefix}{path}.{NONEXPERT_PARTS[part]}"),
                                             (oc, ic), linear.bits, linear.group_size, dtype)
        bias = tensors.get(f"{prefix}{path}.bias")
        parent, _, name = path.rpartition(".")
        setattr(module_at(layer, parent) if parent else layer, name,
                VqLinear(projection, ic, oc, None if bias is None else bias.to(dtype)))


def _materialise_rotary(model, config) -> None:
    """Rotary embeddings hold non-persistent buffers that are not in any checkpoint: rebuild them."""
    from kbvq_cli.streaming import module_at

    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            parent, _, child = name.rpartition(".")
            setattr(module_at(model, parent) if parent else model, child, type(module)(config=config))


def _dtype(config, dtype):
    if dtype is not None:
        return dtype
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def load_reference(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A pack's reference model: a transformers model of its original class, in eval mode on `device`.

    `dtype` is the compute dtype of the whole model (default: the original checkpoint's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kbvq_cli.adapters import adapter_for

    stage_dir = pack_directory(path)
    config = AutoConfig.from_pretrained(str(stage_dir.path))
    quantization = getattr(config, "quantization_config", None) or {}
    if quantization.get("quant_method") != "kbvq":
        raise KbvqError(f"{stage_dir.path}/config.json has no kbvq quantization_config; repack with `kbvq pack`")
    del config.quantization_config
    adapter, dtype = adapter_for(config.model_type), _dtype(config, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for unit in stage_dir.unit_names():
        tensors, meta = stage_dir.read_unit(unit), PackedUnitMeta.from_json(stage_dir.read_metadata(unit))
        if meta.moe:
            _install_layer(model, adapter, meta.layer, tensors, meta, dtype)
        if meta.nonexpert:
            _install_nonexpert(model, adapter, meta.layer, tensors, meta, dtype)
        state.update({name: value.to(dtype) if value.is_floating_point() else value
                      for name, value in tensors.items() if category(name) == "unquantized"})
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_rotary(model, config)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise KbvqError(f"the packed model in {stage_dir.path} lacks {missing[0]} (and {len(missing) - 1} more); "
                        f"repack it with `kbvq pack --restart`")
    model.kbvq_quantization_config = quantization  # not on model.config: transformers would look for a quantizer
    return model.eval().to(device)
