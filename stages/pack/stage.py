"""`kbvq pack`: write the quantized model as a compact, self-describing, loadable directory.

Reads the expert codes of the run's method (kbvq: klt-svd's shared basis and coefficients, vq's
codebooks and indices, bcos's scale and shift; gptq: the RTN/GPTQ codes), bit-packs the codes, copies
every weight the recipe does not quantize, and records the storage: measured bytes per part beside the
docs/method.md §5 formula. Then the side files that make it a transformers checkpoint (config.json with
the quantization_config, tokenizer, `model.safetensors.index.json`, the model card), rewritten on every
`kbvq pack` so an edited or lost one is restored. The format (tensor names, unit metadata, accounting,
side files) is `kbvq_cli.packed`.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from kbvq_cli import distributed
from kbvq_cli.console import info, progress_bar
from kbvq_cli.experts import PROJECTIONS, SHARED
from kbvq_cli.model_files import ModelSource
from kbvq_cli.packed.bitpack import pack_indices
from kbvq_cli.packed.layout import FORMAT, FORMAT_VERSION, NONEXPERT_PARTS, REST_UNIT, routed_prefix, shared_prefix
from kbvq_cli.packed.model_card import SOURCE_KEY, write_model_card
from kbvq_cli.packed.side_files import COPIED_FILES, write_side_files
from kbvq_cli.packed.schema import SCALAR, VQ, PackedLinear, PackedPart, PackedUnitMeta
from kbvq_cli.packed.storage import StorageTally, finish_storage, print_storage, unit_storage
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.scalar_quant import QuantizedLinear
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.units import expert_ids, layer_unit
from kbvq_cli.stage_dir import StageDir, read_manifest
from stages.bcos.reader import BcosCorrections
from stages.eval.reader import run_card_rows
from stages.gptq.reader import GptqCodes
from stages.klt_svd.reader import KltSvd, budget_code_sizes
from stages.nonexpert.reader import NonExpertCodes
from stages.pack.config import PackSettings
from stages.vq.reader import VqCodes

STAGE = "pack"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = COPIED_FILES  # what `kbvq pack --dense` copies too


def run(resolved: ResolvedStage, restart: bool = False, out: str | None = None) -> dict:
    settings: PackSettings = resolved.settings
    source = ModelSource(require_model(resolved))
    packer = PACKERS[resolved.recipe.method or "kbvq"](resolved.run_dir)
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint())
    if not stage.complete:
        nonexpert = NonExpertCodes(resolved.run_dir) if "nonexpert" in stage.upstream else None
        stage.dir.commit_aux({}, {SOURCE_KEY: resolved.model})
        _pack_all(stage, source, packer, nonexpert, settings)
    if not distributed.world().leader:  # rank 0 writes the side files and the copy
        return stage.dir.manifest["summary"]
    write_side_files(stage.dir, source.path, packer.quantization_config(source),
                     run_card_rows(resolved.run_dir, stage.dir))
    summary = stage.dir.manifest["summary"]
    print_storage(summary["storage"], stage.dir.path)
    if out:
        export(stage.dir, Path(out), resolved.run_dir)
    return summary


def _shared_path(source: ModelSource, state: dict) -> str | None:
    return next((p for p in source.adapter.shared_experts if f"{p}.gate_proj.weight" in state), None)


def _shapes(source: ModelSource, state: dict, shared_path: str | None) -> dict[str, tuple[int, int]]:
    """Projection -> (oc, ic) of the routed experts, and "shared.<projection>" of the shared expert."""
    adapter = source.adapter
    gate_up = state[f"{adapter.experts}.gate_up_proj"]
    half = gate_up.shape[1] // 2
    shapes = {"gate": (half, gate_up.shape[2]), "up": (half, gate_up.shape[2]),
              "down": tuple(state[f"{adapter.experts}.down_proj"].shape[1:])}
    if shared_path is not None:
        shapes.update({f"shared.{p}": tuple(state[f"{shared_path}.{p}_proj.weight"].shape) for p in PROJECTIONS})
    return shapes


class VqPacker:
    """kbvq (and plain VQ) runs: shared basis and coefficients, VQ codes, BCOS corrections."""

    def __init__(self, run_dir: Path):
        self.klt, self.codes, self.bcos = KltSvd(run_dir), VqCodes(run_dir), BcosCorrections(run_dir)
        self.layers = self.klt.layers()

    def pack_layer(self, source: ModelSource, state: dict, index: int) -> tuple[dict, PackedUnitMeta]:
        """The quantized expert tensors of one MoE layer (names in kbvq_cli.packed.layout) and their metadata."""
        adapter = source.adapter
        parts = self.klt.layer(index)
        corrections = self.bcos.layer(index) if self.bcos.corrects else None
        shared_path = _shared_path(source, state)
        units = {e: self.codes.expert(index, e) for e in range(source.num_experts)}
        sizes = {projection: units[0].code_size(projection) for projection in PROJECTIONS}
        width = {projection: bits * dim for projection, (bits, dim) in sizes.items()}
        tensors = {}
        for projection in PROJECTIONS:
            prefix = routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
            tensors[prefix + "indices"] = torch.stack([pack_indices(units[e].indices[projection], width[projection])
                                                       for e in sorted(units)])
            tensors[prefix + "codebook"] = torch.stack([units[e].codebooks[projection] for e in sorted(units)])
            if corrections is not None:
                tensors[prefix + "scale"] = corrections.routed[projection].scale
                tensors[prefix + "shift"] = corrections.routed[projection].shift
            if projection in parts.parts:
                tensors[prefix + "shared_basis"] = parts.basis(projection)
                tensors[prefix + "expert_coeffs"] = parts.coeffs(projection)
        stacked = self._pack_shared(adapter, index, shared_path, parts, corrections, width, tensors)
        # per-projection sizes only where a budget chose others: a pack at vq's own size is as before
        mixed = any(size != (self.codes.bits, self.codes.dim) for size in sizes.values())
        meta = PackedUnitMeta(layer=index, moe=True, format=VQ, bits=self.codes.bits, dim=self.codes.dim,
                              shapes=_shapes(source, state, shared_path),
                              parts={name: PackedPart(p.side, p.rank) for name, p in parts.parts.items()},
                              shared_path=shared_path, shared_stacked=stacked, corrected=corrections is not None,
                              code_sizes=sizes if mixed else {})
        return tensors, meta

    def _pack_shared(self, adapter, index, shared_path, parts, corrections, width, tensors) -> dict[str, bool]:
        """The shared expert's tensors, without the expert dim (`width`: bits per code per projection);
        which projections were stacked."""
        if shared_path is None:
            return {}
        unit, stacked = self.codes.expert(index, SHARED), {}
        for projection in PROJECTIONS:
            prefix = shared_prefix(adapter.layers_prefix, shared_path, index, projection)
            tensors[prefix + "indices"] = pack_indices(unit.indices[projection], width[projection])
            tensors[prefix + "codebook"] = unit.codebooks[projection]
            if corrections is not None:
                tensors[prefix + "scale"] = corrections.shared[projection].scale
                tensors[prefix + "shift"] = corrections.shared[projection].shift
            stacked_coeffs = parts.stacked_shared_coeffs(projection)
            stacked[projection] = stacked_coeffs is not None
            if stacked_coeffs is not None:
                tensors[prefix + "expert_coeffs"] = stacked_coeffs
            elif f"{SHARED}.{projection}" in parts.parts:
                tensors[prefix + "shared_basis"] = parts.basis(f"{SHARED}.{projection}")
                tensors[prefix + "expert_coeffs"] = parts.coeffs(f"{SHARED}.{projection}")[0]
        return stacked

    def quantization_config(self, source: ModelSource) -> dict:
        klt_config = self.klt.stage_dir.manifest["config"]
        bits, dim = self.codes.bits, self.codes.dim
        return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "bits": bits, "vector_length": dim,
                "codebook_size": 2 ** (bits * dim), "index_bits": bits * dim,
                "rank": {key: klt_config.get(key) for key in ("rank_ratio", "rank", "energy")},
                "klt": klt_config.get("klt"), "down": klt_config.get("down"), "bcos": self.bcos.mode,
                "modules": [source.adapter.experts, *source.adapter.shared_experts], "layers": self.layers,
                "store_dtype": "float16", **self._chosen_code_sizes()}

    def _chosen_code_sizes(self) -> dict:
        """A bit budget's code sizes per layer and projection (each shard's metadata holds its own)."""
        chosen = budget_code_sizes(self.klt.stage_dir.path.parent)
        return {"code_sizes": {str(layer): {p: f"{b}x{d}" for p, (b, d) in found.items()}
                               for layer, found in chosen.items()}} if chosen else {}


def scalar_parts(q: QuantizedLinear, bits: int) -> dict[str, torch.Tensor]:
    """One RTN/GPTQ matrix as the pack stores it: `codes` bit-packed at `bits`, `qscale`, `qzero`
    (and `group_index`)."""
    found = {"codes": pack_indices(q.codes, bits), "qscale": q.scale, "qzero": q.zero}
    if q.group_index is not None:
        found["group_index"] = q.group_index
    return found


class ScalarPacker:
    """RTN/GPTQ runs: per projection `codes` bit-packed at `bits`, `qscale` and `qzero` 16-bit [oc, G]
    (and `group_index` [ic] with act_order), with the expert dim for routed experts."""

    def __init__(self, run_dir: Path):
        self.gptq = GptqCodes(run_dir)
        self.layers = self.gptq.layers()

    def pack_layer(self, source: ModelSource, state: dict, index: int) -> tuple[dict, PackedUnitMeta]:
        adapter, bits = source.adapter, self.gptq.bits
        shared_path = _shared_path(source, state)
        units = {e: self.gptq.expert(index, e) for e in expert_ids(source.num_experts, shared_path is not None)}
        tensors = {}
        for projection in PROJECTIONS:
            routed = [scalar_parts(units[e].matrices[projection], bits) for e in range(source.num_experts)]
            prefix = routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
            tensors.update({prefix + part: torch.stack([r[part] for r in routed]) for part in routed[0]})
            if shared_path:
                prefix = shared_prefix(adapter.layers_prefix, shared_path, index, projection)
                tensors.update({prefix + part: t
                                for part, t in scalar_parts(units[SHARED].matrices[projection], bits).items()})
        meta = PackedUnitMeta(layer=index, moe=True, format=SCALAR, bits=bits, group_size=self.gptq.group_size,
                              shapes=_shapes(source, state, shared_path), shared_path=shared_path)
        return tensors, meta

    def quantization_config(self, source: ModelSource) -> dict:
        config = self.gptq.stage_dir.manifest["config"]
        return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "format": SCALAR,
                "method": config["method"], "bits": config["bits"], "group_size": config["group_size"],
                "act_order": config["act_order"], "modules": [source.adapter.experts, *source.adapter.shared_experts],
                "layers": self.layers, "store_dtype": "float16"}


# The packer of a run is chosen by its method, once; everything after that is the packer's own methods.
PACKERS = {"kbvq": VqPacker, "gptq": ScalarPacker}


def pack_nonexpert(nonexpert: NonExpertCodes | None, source: ModelSource, index: int, tensors: dict
                   ) -> dict[str, PackedLinear]:
    """Replace the layer's quantized non-expert weights in `tensors` by their codes (kbvq_cli.packed.layout)."""
    if nonexpert is None or not nonexpert.has(index):
        return {}
    prefix = f"{source.adapter.layers_prefix}.{index}."
    matrices, found = nonexpert.layer(index), {}
    for path, meta in nonexpert.meta(index).linears.items():
        del tensors[f"{prefix}{path}.weight"]
        tensors.update({f"{prefix}{path}.{NONEXPERT_PARTS[part]}": tensor
                        for part, tensor in scalar_parts(matrices[path], nonexpert.bits).items()})
        found[path] = PackedLinear(meta.shape, nonexpert.bits, nonexpert.group_size)
    return found


def _unit_size(source: ModelSource, index) -> int:
    """The weight count of layer `index`, or of the rest (`REST_UNIT`: embeddings, final norm, head)."""
    sizes, prefix = source.tensor_sizes, source.adapter.layers_prefix + "."
    if index == REST_UNIT:
        return sum(size for name, size in sizes.items() if not name.startswith(prefix))
    return sum(sizes[name] for name in source.layer_tensor_names.get(index, []))


def _pack_all(stage: StageRun, source: ModelSource, packer, nonexpert: NonExpertCodes | None,
              settings: PackSettings) -> None:
    stage_dir, quantized_layers = stage.dir, set(packer.layers)
    with progress_bar() as progress:
        task = progress.add_task("pack layers", total=source.num_layers + 1)
        # under torchrun, this rank's share of the layers and the rest (embeddings, head)
        share = stage.mine([*range(source.num_layers), REST_UNIT], lambda i: i if i == REST_UNIT else layer_unit(i),
                           lambda i: _unit_size(source, i))
        for index in (i for i in share if i != REST_UNIT):
            name = layer_unit(index)
            if not stage_dir.has_unit(name):
                progress.update(task, description=f"pack layer {index}")
                state = source.layer_state_dict(index)
                quantized = index in quantized_layers
                tensors, meta = packer.pack_layer(source, state, index) if quantized else ({}, PackedUnitMeta(index))
                tensors.update(_unquantized(source, state, index, quantized, settings.unquantized_dtype))
                meta = replace(meta, nonexpert=pack_nonexpert(nonexpert, source, index, tensors))
                meta = replace(meta, storage=unit_storage(tensors, meta))
                stage_dir.write_unit(name, tensors, meta.to_json())
            progress.advance(task)
        if REST_UNIT in share and not stage_dir.has_unit(REST_UNIT):
            tensors = {name: _convert(source.tensor(name), settings.unquantized_dtype)
                       for name in source.weight_map if not name.startswith(source.adapter.layers_prefix + ".")}
            source.release()
            stage_dir.write_unit(REST_UNIT, tensors, PackedUnitMeta(storage=unit_storage(tensors, PackedUnitMeta()))
                                 .to_json())
        progress.advance(task, int(REST_UNIT in share))
    stage.gather()
    tally = StorageTally.from_units(stage_dir)
    stage.finish({"seconds": round(stage.seconds, 3), "storage": finish_storage(tally, stage_dir.path, source)})


def _convert(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    return tensor.to(DTYPES[dtype]) if dtype in DTYPES and tensor.is_floating_point() else tensor


def _unquantized(source: ModelSource, state: dict, index: int, quantized: bool, dtype: str) -> dict:
    """The layer's tensors that stay as they are, under their full in-memory names."""
    adapter, prefix = source.adapter, f"{source.adapter.layers_prefix}.{index}."
    skip = set()
    if quantized:
        skip = {f"{adapter.experts}.gate_up_proj", f"{adapter.experts}.down_proj"}
        skip |= {f"{path}.{p}_proj.weight" for path in adapter.shared_experts for p in PROJECTIONS}
    return {prefix + name: _convert(tensor, dtype) for name, tensor in state.items() if name not in skip}


def export(stage_dir: StageDir, out: Path, run_dir: Path) -> None:
    """Copy a finished pack directory to `out` (a staging directory renamed into place). The copy's manifest
    names the run it came from, so its messages name the command that rewrites it, and its model card the
    directory it is in."""
    if out.resolve() == stage_dir.path.resolve():
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(stage_dir.path, staging)
    copy = StageDir(staging, {**read_manifest(staging), "origin": str(Path(run_dir).resolve())})
    write_model_card(copy, run_card_rows(run_dir, stage_dir), name=str(out))  # commits the manifest too
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    info(f"pack: copied to {out}")
