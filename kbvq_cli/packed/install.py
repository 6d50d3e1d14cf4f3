"""Replace the expert modules of a model skeleton by the runtime modules of a pack, from the shards' headers.

Called on the meta device before transformers loads any tensor (`kbvq_cli.packed.quantizer`): each
shard's header gives its unit metadata (`PackedUnitMeta`, under the `kbvq` key) and the dtype and shape
of every tensor, which is all the modules need to exist; the loader then fills their buffers by name.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.packed.layout import NONEXPERT_PARTS, routed_prefix, shared_prefix
from kbvq_cli.packed.modules import VQ_PARTS, ScalarExperts, ScalarProjection, TensorSpec, VqExperts, VqProjection
from kbvq_cli.packed.schema import SCALAR, PackedUnitMeta

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SCALAR_PARTS = ("codes", "qscale", "qzero", "group_index")


def read_unit_header(path: Path) -> tuple[PackedUnitMeta, dict[str, TensorSpec]]:
    """A pack shard's unit metadata and tensor name -> (dtype, shape), from its header alone."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    if "kbvq" not in metadata:
        raise KbvqError(f"{path} is not a kbvq pack shard (no kbvq metadata in its header)")
    specs = {name: (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])) for name, entry in header.items()}
    return PackedUnitMeta.from_json(json.loads(metadata["kbvq"])), specs


def _module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path) if path else root


def _replace(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_module_at(root, parent), name, module)


def _side(meta: PackedUnitMeta, name: str) -> str:
    return meta.parts[name].side if name in meta.parts else "input"


def _vq_projection(specs: dict, prefix: str, shape, width: int, side: str, routed: bool,
                   borrowed=None) -> VqProjection:
    parts = {part: specs[prefix + part] for part in VQ_PARTS if prefix + part in specs}
    return VqProjection(parts, shape, width, side, routed, borrowed)


def _scalar_projection(specs: dict, prefix: str, names: dict[str, str], shape, meta_bits: int, group_size: int,
                       routed: bool, bias: TensorSpec | None = None) -> ScalarProjection:
    present = {part: name for part, name in names.items() if prefix + name in specs}
    parts = {name: specs[prefix + name] for name in present.values()}
    return ScalarProjection(parts, present, shape, meta_bits, group_size, routed, bias)


def _install_experts(layer, adapter, meta: PackedUnitMeta, specs: dict) -> None:
    index, original = meta.layer, layer.get_submodule(adapter.experts)
    routed_of = lambda p: routed_prefix(adapter.layers_prefix, adapter.experts, index, p)  # noqa: E731
    shared_of = lambda p: shared_prefix(adapter.layers_prefix, meta.shared_path, index, p)  # noqa: E731
    identity = {part: part for part in SCALAR_PARTS}
    if meta.format == SCALAR:
        build = lambda prefix, key, routed: _scalar_projection(  # noqa: E731
            specs, prefix, identity, meta.shapes[key], meta.bits, meta.group_size, routed)
        routed = {p: build(routed_of(p), p, True) for p in PROJECTIONS}
        shared = {p: build(shared_of(p), f"shared.{p}", False) for p in PROJECTIONS} if meta.shared_path else {}
        experts_class = ScalarExperts
    else:
        routed = {p: _vq_projection(specs, routed_of(p), meta.shapes[p], meta.projection_width(p), _side(meta, p),
                                    True) for p in PROJECTIONS}
        shared = {}
        for p in PROJECTIONS if meta.shared_path else ():
            stacked = meta.shared_stacked.get(p, False)
            # A stacked shared expert's coefficients are against the routed basis, stored once, under routed.
            borrowed = (lambda owner=routed[p]: owner.shared_basis) if stacked else None
            side = _side(meta, p) if stacked else _side(meta, f"shared.{p}")
            shared[p] = _vq_projection(specs, shared_of(p), meta.shapes[f"shared.{p}"], meta.projection_width(p),
                                       side, False, borrowed)
        experts_class = VqExperts
    num_experts = routed["gate"].part("codebook" if meta.format != SCALAR else "qscale").shape[0]
    _replace(layer, adapter.experts, experts_class(routed["gate"], routed["up"], routed["down"], original.act_fn,
                                                   num_experts))
    for p, module in shared.items():
        _replace(layer, f"{meta.shared_path}.{p}_proj", module)


def _install_nonexpert(layer, adapter, meta: PackedUnitMeta, specs: dict, dtype: torch.dtype) -> None:
    """Each non-expert linear quantized by `kbvq nonexpert` (RTN/GPTQ codes, its bias kept)."""
    prefix = f"{adapter.layers_prefix}.{meta.layer}."
    for path, linear in meta.nonexpert.items():
        bias = specs.get(f"{prefix}{path}.bias")
        module = _scalar_projection(specs, f"{prefix}{path}.", NONEXPERT_PARTS, linear.shape, linear.bits,
                                    linear.group_size, False, None if bias is None else (dtype, bias[1]))
        _replace(layer, path, module)


def install_pack_modules(model: torch.nn.Module, adapter, shard_files: list[Path], dtype: torch.dtype) -> None:
    """Put the runtime modules of every packed layer into `model` (on the meta device, before loading).

    `dtype` is the compute dtype: only a quantized linear's bias takes it; every stored part keeps its own.
    """
    for path in shard_files:
        meta, specs = read_unit_header(path)
        if meta.layer is None:
            continue
        layer = _module_at(model, f"{adapter.layers_prefix}.{meta.layer}")
        if meta.moe:
            _install_experts(layer, adapter, meta, specs)
        if meta.nonexpert:
            _install_nonexpert(layer, adapter, meta, specs, dtype)


def finish_pack_modules(model: torch.nn.Module) -> None:
    """After loading: codes into their resident layout, and a one-line error for anything left unloaded."""
    for module in model.modules():
        if isinstance(module, (VqProjection, ScalarProjection)):
            if any(t.is_meta for t in module.buffers(recurse=False)):
                continue  # reported below, by name
            module.to_resident()
    missing = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise KbvqError(f"the pack lacks {missing[0]} (and {len(missing) - 1} more tensors the model needs); "
                        f"repack it with `kbvq pack --restart`")
