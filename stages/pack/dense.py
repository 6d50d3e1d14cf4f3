"""`kbvq pack --dense`: the quantized model as a plain checkpoint of the original architecture.

For tools that cannot load the packed format (vLLM, llama.cpp converters): every expert matrix is
written as `(1 + scale) * What` under the checkpoint's own on-disk names (per-expert tensors), in the
original dtype. The BCOS shift is a per-channel bias, and the original experts have no bias: it
cannot be represented and is dropped, with a warning that says so; measure the effect with
`kbvq eval --model DENSE_DIR`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kbvq_cli.console import info, progress_bar, warn
from kbvq_cli.experts import PROJECTIONS
from kbvq_cli.model_files import ModelSource
from kbvq_cli.packed.layout import NONEXPERT_PARTS
from kbvq_cli.packed.integrity import pack_directory
from kbvq_cli.packed.reference_loader import build_scalar_projection, layer_projections
from kbvq_cli.packed.schema import PackedUnitMeta
from kbvq_cli.packed.storage import category
from kbvq_cli.stage_run import require_model


def disk_name(adapter, name: str) -> str:
    """In-memory name -> the checkpoint's on-disk name (Mixtral's MoE block is `block_sparse_moe`)."""
    marker = f".{adapter.moe_block}."
    if adapter.disk_moe_block != adapter.moe_block and marker in name:
        return name.replace(marker, f".{adapter.disk_moe_block}.", 1)
    return name


def _expert_tensors(adapter, index: int, tensors: dict, meta: PackedUnitMeta, dtype) -> tuple[dict, bool]:
    routed, shared = layer_projections(tensors, meta, adapter, index, torch.float32)
    prefix = f"{adapter.layers_prefix}.{index}."
    out, shifted = {}, False
    disk_names = dict(zip(PROJECTIONS, adapter.disk_expert_names))
    for projection, module in routed.items():
        shifted |= module.shift is not None and bool(module.shift.abs().max() > 0)
        for expert in range(module.num_experts):
            name = f"{prefix}{adapter.experts}.{expert}.{disk_names[projection]}.weight"
            out[disk_name(adapter, name)] = module.dense_weight(expert).to(dtype)
    for projection, module in shared.items():
        shifted |= module.shift is not None and bool(module.shift.abs().max() > 0)
        out[f"{prefix}{meta.shared_path}.{projection}_proj.weight"] = module.dense_weight(0).to(dtype)
    return out, shifted


def _nonexpert_tensors(adapter, meta: PackedUnitMeta, tensors: dict, dtype) -> dict:
    """The dequantized weights of the layer's non-expert linears that `kbvq nonexpert` quantized."""
    out = {}
    prefix = f"{adapter.layers_prefix}.{meta.layer}."
    for path, linear in meta.nonexpert.items():
        module = build_scalar_projection(lambda part: tensors.get(f"{prefix}{path}.{NONEXPERT_PARTS[part]}"),
                                         linear.shape, linear.bits, linear.group_size, torch.float32)
        out[disk_name(adapter, f"{prefix}{path}.weight")] = module.dense_weight(0).to(dtype)
    return out


def export_dense(resolved, out: str | None) -> Path:
    from safetensors.torch import save_file

    from kbvq_cli.atomic import atomic_write_json
    from stages.pack.stage import TOKENIZER_FILES, run as run_pack

    run_pack(resolved)
    pack, source = pack_directory(resolved.run_dir), ModelSource(require_model(resolved))
    target = Path(out) if out else resolved.run_dir / "dense"
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = source.tensor(source.adapter.embed_tokens).dtype
    units, weight_map, dropped = pack.unit_names(), {}, False
    with progress_bar() as progress:
        task = progress.add_task("dense export", total=len(units))
        for number, unit in enumerate(units, 1):
            tensors, meta = pack.read_unit(unit), PackedUnitMeta.from_json(pack.read_metadata(unit))
            dense = {disk_name(source.adapter, n): t for n, t in tensors.items() if category(n) == "unquantized"}
            if meta.moe:
                experts, shifted = _expert_tensors(source.adapter, meta.layer, tensors, meta, dtype)
                dense.update(experts)
                dropped |= shifted
            dense.update(_nonexpert_tensors(source.adapter, meta, tensors, dtype))
            file = f"model-{number:05d}-of-{len(units):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in dense.items()}, str(staging / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in dense})
            progress.advance(task)
    atomic_write_json(staging / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    shutil.copyfile(source.path / "config.json", staging / "config.json")
    for name in TOKENIZER_FILES:
        if (source.path / name).exists():
            shutil.copyfile(source.path / name, staging / name)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    if dropped:
        warn("dense export: the BCOS shifts are per-channel biases the original architecture cannot hold; "
             f"they were dropped (the scales are folded in); measure the effect with `kbvq eval --model {target}`")
    info(f"dense export: {target} ({sum(p.stat().st_size for p in target.glob('*.safetensors')):,} bytes)")
    return target
