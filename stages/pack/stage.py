"""`kbvq pack`: write the quantized model as a compact, self-describing, loadable directory.

Reads klt-svd (shared basis, coefficients), vq (codebooks, indices) and bcos (scale, shift), bit-packs
the indices at `b*d` bits, copies every weight the recipe does not quantize, and records the storage:
measured bytes per part beside the METHOD.md §5 formula. The layout is in `stages.pack.layout`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from kbvq_cli.console import info, progress_bar
from kbvq_cli.experts import PROJECTIONS, SHARED
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_common import hashed_settings, open_stage, require_model, upstream_inputs
from kbvq_cli.stage_dir import StageDir, layer_unit
from stages.klt_svd.reader import KltSvd
from stages.pack.bitpack import pack_indices
from stages.pack.layout import FORMAT, FORMAT_VERSION, NONEXPERT_PARTS, REST_UNIT, routed_prefix, shared_prefix
from stages.pack.storage import StorageTally, finish_storage, moe_layer_storage, print_storage
from stages.vq.reader import VqCodes

STAGE = "pack"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "generation_config.json", "chat_template.jinja")


def run(resolved: ResolvedStage, restart: bool = False, out: str | None = None) -> dict:
    settings = resolved.settings
    source = ModelSource(require_model(resolved))
    quantizer = Quantizer.of_run(resolved)
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings),
                           {"upstream": upstream_inputs(quantizer.upstream), "model": source.fingerprint()}, restart)
    if not stage_dir.complete:
        _pack_all(stage_dir, source, quantizer, settings)
    summary = stage_dir.manifest["summary"]
    print_storage(summary["storage"], stage_dir.path)
    if out:
        export(stage_dir.path, Path(out))
    return summary


class Quantizer:
    """What produced a run's expert codes: kbvq (klt-svd, vq, bcos) or the RTN/GPTQ baselines (gptq)."""

    def __init__(self, run_dir: Path, method: str):
        self.method = method
        if method == "gptq":
            from stages.gptq.reader import GptqCodes

            self.gptq = GptqCodes(run_dir)
            self.upstream = {"gptq": self.gptq.stage_dir}
            self.layers = sorted({int(name.split(".")[0].split("_")[1]) for name in self.gptq.stage_dir.unit_names()})
        else:
            self.klt, self.codes = KltSvd(run_dir), VqCodes(run_dir)
            self.bcos = StageDir.open_finished(run_dir, "bcos")
            self.upstream = {"klt-svd": self.klt.stage_dir, "vq": self.codes.stage_dir, "bcos": self.bcos}
            self.layers = self.klt.layers()
            self.vq_config = self.codes.stage_dir.manifest["config"]
            self.mode = self.bcos.manifest["config"]["mode"]
        self.nonexpert = None  # the layers outside the experts, if `kbvq nonexpert` quantized them
        if (run_dir / "nonexpert" / "manifest.json").exists():
            nonexpert = StageDir.open_finished(run_dir, "nonexpert")
            if nonexpert.unit_names():  # method none quantizes nothing: the pack does not depend on it
                self.nonexpert = nonexpert
                self.upstream["nonexpert"] = nonexpert

    @classmethod
    def of_run(cls, resolved: ResolvedStage) -> "Quantizer":
        return cls(resolved.run_dir, resolved.recipe.method or "kbvq")

    def pack_nonexpert(self, source: ModelSource, index: int, tensors: dict, metadata: dict) -> None:
        """Replace the layer's quantized non-expert weights by their codes (see stages.pack.layout)."""
        if self.nonexpert is None or not self.nonexpert.has_unit(layer_unit(index)):
            return
        config, units = self.nonexpert.manifest["config"], self.nonexpert.read_unit(layer_unit(index))
        linears = self.nonexpert.read_metadata(layer_unit(index))["linears"]
        prefix = f"{source.adapter.layers_prefix}.{index}."
        for path in linears:
            del tensors[f"{prefix}{path}.weight"]
            tensors.update({f"{prefix}{path}.{NONEXPERT_PARTS[part]}": tensor
                            for part, tensor in scalar_parts(units, path, config["bits"]).items()})
        metadata["nonexpert"] = {path: {"shape": meta["shape"], "bits": config["bits"],
                                        "group_size": config["group_size"]} for path, meta in linears.items()}

    def pack_layer(self, source: ModelSource, state: dict, index: int) -> tuple[dict, dict]:
        if self.method == "gptq":
            return pack_scalar_layer(source, state, self.gptq, index)
        return pack_moe_layer(source, state, self.klt, self.codes, self.bcos, index, self.vq_config, self.mode)

    def storage(self, tensors: dict, metadata: dict) -> dict:
        if self.method == "gptq":
            return moe_layer_storage(tensors, metadata, {}, False)
        return moe_layer_storage(tensors, metadata, self.vq_config, self.mode != "none")

    def quantization_config(self, source: ModelSource) -> dict:
        if self.method == "gptq":
            config = self.gptq.stage_dir.manifest["config"]
            return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "format": "scalar",
                    "method": config["method"], "bits": config["bits"], "group_size": config["group_size"],
                    "act_order": config["act_order"], "modules": [source.adapter.experts,
                                                                   *source.adapter.shared_experts],
                    "layers": self.layers, "store_dtype": "float16"}
        return quantization_config(source, self.vq_config, self.mode, self.klt)


def _pack_all(stage_dir: StageDir, source: ModelSource, quantizer: Quantizer, settings) -> None:
    started = time.time()
    quantized_layers = set(quantizer.layers)
    with progress_bar() as progress:
        task = progress.add_task("pack layers", total=source.num_layers + 1)
        for index in range(source.num_layers):
            name = layer_unit(index)
            if not stage_dir.has_unit(name):
                progress.update(task, description=f"pack layer {index}")
                state = source.layer_state_dict(index)
                tensors, metadata = quantizer.pack_layer(source, state, index) if index in quantized_layers \
                    else ({}, {"moe": False})
                tensors.update(_unquantized(source, state, index, quantized=index in quantized_layers,
                                            dtype=settings.unquantized_dtype))
                quantizer.pack_nonexpert(source, index, tensors, metadata)
                metadata["storage"] = quantizer.storage(tensors, metadata)
                stage_dir.write_unit(name, tensors, {"layer": index, **metadata})
            progress.advance(task)
        if not stage_dir.has_unit(REST_UNIT):
            tensors = {name: _convert(source.tensor(name), settings.unquantized_dtype)
                       for name in source.weight_map if not name.startswith(source.adapter.layers_prefix + ".")}
            source.release()
            stage_dir.write_unit(REST_UNIT, tensors, {"storage": moe_layer_storage(tensors, {}, {}, False)})
        progress.advance(task)
    _write_side_files(stage_dir.path, source, quantizer.quantization_config(source))
    tally = StorageTally.from_units(stage_dir)
    stage_dir.finish({"seconds": round(time.time() - started, 3),
                      "storage": finish_storage(tally, stage_dir.path, source)})


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


def _shared_path(source: ModelSource, state: dict) -> str | None:
    return next((p for p in source.adapter.shared_experts if f"{p}.gate_proj.weight" in state), None)


def pack_moe_layer(source: ModelSource, state: dict, klt: KltSvd, codes: VqCodes, bcos: StageDir, index: int,
                   vq_config: dict, mode: str) -> tuple[dict, dict]:
    """The quantized expert tensors of one MoE layer (layout in stages.pack.layout) and their metadata."""
    adapter, bits, dim = source.adapter, vq_config["bits"], vq_config["dim"]
    width = bits * dim
    parts = klt.layer(index)
    corrections = bcos.read_unit(layer_unit(index)) if mode != "none" else {}
    shared_path = _shared_path(source, state)
    gate_up = state[f"{adapter.experts}.gate_up_proj"]
    half = gate_up.shape[1] // 2
    shapes = {"gate": [half, gate_up.shape[2]], "up": [half, gate_up.shape[2]],
              "down": list(state[f"{adapter.experts}.down_proj"].shape[1:])}
    units = {e: codes.expert(index, e) for e in range(source.num_experts)}
    tensors = {}
    for projection in PROJECTIONS:
        prefix = routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
        tensors[prefix + "indices"] = torch.stack([pack_indices(units[e][f"{projection}.indices"], width)
                                                   for e in sorted(units)])
        tensors[prefix + "codebook"] = torch.stack([units[e][f"{projection}.codebook"] for e in sorted(units)])
        if corrections:
            tensors[prefix + "scale"] = corrections[f"{projection}.scale"]
            tensors[prefix + "shift"] = corrections[f"{projection}.shift"]
        if projection in parts.parts:
            tensors[prefix + "shared_basis"] = parts.tensors[f"{projection}.shared_basis"]
            tensors[prefix + "expert_coeffs"] = parts.tensors[f"{projection}.expert_coeffs"]
    stacked = {}
    if shared_path is not None:
        shared_unit = codes.expert(index, SHARED)
        for projection in PROJECTIONS:
            weight = state[f"{shared_path}.{projection}_proj.weight"]
            shapes[f"shared.{projection}"] = list(weight.shape)
            prefix = shared_prefix(adapter.layers_prefix, shared_path, index, projection)
            tensors[prefix + "indices"] = pack_indices(shared_unit[f"{projection}.indices"], width)
            tensors[prefix + "codebook"] = shared_unit[f"{projection}.codebook"]
            if corrections:
                tensors[prefix + "scale"] = corrections[f"{SHARED}.{projection}.scale"]
                tensors[prefix + "shift"] = corrections[f"{SHARED}.{projection}.shift"]
            stacked[projection] = f"{projection}.shared_expert_coeffs" in parts.tensors
            if stacked[projection]:
                tensors[prefix + "expert_coeffs"] = parts.tensors[f"{projection}.shared_expert_coeffs"]
            elif f"{SHARED}.{projection}" in parts.parts:
                tensors[prefix + "shared_basis"] = parts.tensors[f"{SHARED}.{projection}.shared_basis"]
                tensors[prefix + "expert_coeffs"] = parts.tensors[f"{SHARED}.{projection}.expert_coeffs"][0]
    part_meta = {name: {"side": p["side"], "rank": p["rank"]} for name, p in parts.parts.items()}
    return tensors, {"moe": True, "bits": bits, "dim": dim, "shapes": shapes, "parts": part_meta,
                     "shared_path": shared_path, "shared_stacked": stacked, "corrected": bool(corrections)}


def scalar_parts(unit: dict, key: str, bits: int) -> dict:
    """One RTN/GPTQ matrix of a stage unit (`stages.gptq.stage.stored_tensors`) as the pack stores it:
    `codes` bit-packed at `bits`, `qscale`, `qzero` (and `group_index`)."""
    found = {"codes": pack_indices(unit[f"{key}.codes"], bits), "qscale": unit[f"{key}.scale"],
             "qzero": unit[f"{key}.zero"]}
    if f"{key}.group_index" in unit:
        found["group_index"] = unit[f"{key}.group_index"]
    return found


def pack_scalar_layer(source: ModelSource, state: dict, gptq, index: int) -> tuple[dict, dict]:
    """RTN/GPTQ codes of one MoE layer: per projection `codes` bit-packed at `bits`, `qscale` and
    `qzero` 16-bit [oc, G] (and `group_index` [ic] with act_order), with the expert dim for routed experts."""
    adapter, bits = source.adapter, gptq.bits
    shared_path = _shared_path(source, state)
    experts = list(range(source.num_experts)) + (["shared"] if shared_path else [])
    units = {e: gptq.expert(index, e) for e in experts}
    tensors, shapes = {}, {}
    for projection in PROJECTIONS:
        routed = [scalar_parts(units[e], projection, bits) for e in range(source.num_experts)]
        prefix = routed_prefix(adapter.layers_prefix, adapter.experts, index, projection)
        tensors.update({prefix + part: torch.stack([r[part] for r in routed]) for part in routed[0]})
        shapes[projection] = list(units[0][f"{projection}.codes"].shape)
        if shared_path:
            prefix = shared_prefix(adapter.layers_prefix, shared_path, index, projection)
            tensors.update({prefix + part: t for part, t in scalar_parts(units[SHARED], projection, bits).items()})
            shapes[f"shared.{projection}"] = list(units[SHARED][f"{projection}.codes"].shape)
    return tensors, {"moe": True, "format": "scalar", "bits": bits, "group_size": gptq.group_size,
                     "shapes": shapes, "shared_path": shared_path}


def quantization_config(source: ModelSource, vq_config: dict, mode: str, klt: KltSvd) -> dict:
    klt_config = klt.stage_dir.manifest["config"]
    modules = [source.adapter.experts, *source.adapter.shared_experts]
    return {"quant_method": FORMAT, "format_version": FORMAT_VERSION, "bits": vq_config["bits"],
            "vector_length": vq_config["dim"], "codebook_size": 2 ** (vq_config["bits"] * vq_config["dim"]),
            "index_bits": vq_config["bits"] * vq_config["dim"],
            "rank": {key: klt_config.get(key) for key in ("rank_ratio", "rank", "energy")},
            "klt": klt_config.get("klt"), "down": klt_config.get("down"), "bcos": mode,
            "modules": modules, "layers": klt.layers(), "store_dtype": "float16"}


def _write_side_files(path: Path, source: ModelSource, quantization: dict) -> None:
    """config.json with the quantization_config, and the tokenizer and generation files, copied."""
    from kbvq_cli.atomic import atomic_write_json

    config = json.loads((source.path / "config.json").read_text())
    config["quantization_config"] = quantization
    atomic_write_json(path / "config.json", config)
    for name in TOKENIZER_FILES:
        if (source.path / name).exists():
            shutil.copyfile(source.path / name, path / name)


def export(pack_dir: Path, out: Path) -> None:
    """Copy a finished pack directory to `out` (a staging directory renamed into place)."""
    if out.resolve() == pack_dir.resolve():
        return
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(pack_dir, staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    info(f"pack: copied to {out}")
