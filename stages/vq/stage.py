"""`kbvq vq`: vector-quantize every expert matrix's specific part `W_spec = W - W_share`.

One unit per expert: `RUN/vq/layer_NNN.expert_EEE.safetensors` (and `layer_NNN.shared` for a shared
expert) holding, for each projection `P` of `gate`, `up`, `down`: `P.codebook` [K, d] float16 (the
stored, final values) and `P.indices` [oc, ic/d] int16. A 128-expert layer is hours of work on a GPU,
so a killed run resumes at the expert where it stopped.
"""

from __future__ import annotations

import time

import torch

from kbvq_cli.console import info, progress_bar
from kbvq_cli.experts import PROJECTIONS, SHARED, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_common import hashed_settings, open_stage, require_model, upstream_inputs
from kbvq_cli.streaming import pick_device
from stages.klt_svd.reader import KltSvd
from stages.vq.backends import make_backend
from stages.vq.core import dequantize, vq_quantize

STAGE = "vq"
CODEBOOK_DTYPE = torch.float16


def unit_name(layer: int, expert) -> str:
    return f"layer_{layer:03d}.{SHARED}" if expert == SHARED else f"layer_{layer:03d}.expert_{expert:03d}"


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings = resolved.settings
    klt = KltSvd(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device) if settings.backend == "torch" else "cpu"
    inputs = {"upstream": upstream_inputs({"klt-svd": klt.stage_dir}), "model": source.fingerprint(),
              "compute": torch.device(device).type}
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"vq: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    backend, started, errors = make_backend(settings.backend), time.time(), []
    layers = klt.layers()
    per_layer = source.num_experts + (1 if source.adapter.shared_experts else 0)
    with progress_bar() as progress:
        task = progress.add_task("vq experts", total=len(layers) * per_layer)
        for index in layers:
            experts, parts = None, None
            for expert in _expert_ids(source):
                name = unit_name(index, expert)
                if not stage_dir.has_unit(name):
                    if experts is None:
                        experts, parts = layer_experts(source, index, torch.float32, device), klt.layer(index, device)
                    if expert == SHARED and not experts.shared:
                        progress.advance(task)
                        continue
                    progress.update(task, description=f"vq layer {index} expert {expert}")
                    tensors, metadata = quantize_expert(experts, parts, expert, settings, backend)
                    stage_dir.write_unit(name, tensors, {"layer": index, "expert": expert, **metadata})
                if stage_dir.has_unit(name):
                    errors.extend(stage_dir.read_metadata(name)["relative_error"].values())
                progress.advance(task)
    seconds = time.time() - started
    mean_error = sum(errors) / max(len(errors), 1)
    summary = {"layers": len(layers), "units": len(stage_dir.unit_names()), "seconds": round(seconds, 3),
               "mean_relative_weight_error_of_residual": round(mean_error, 6)}
    stage_dir.finish(summary)
    info(f"vq: {len(layers)} layers, {summary['units']} experts in {seconds:.1f}s at {settings.bits} bits "
         f"(d={settings.dim}); mean relative error of the quantized residual {mean_error:.4f}")
    return summary


def _expert_ids(source: ModelSource) -> list:
    return list(range(source.num_experts)) + ([SHARED] if source.adapter.shared_experts else [])


def quantize_expert(experts, parts, expert, settings, backend) -> tuple[dict, dict]:
    """The three projections of one expert: codebooks, indices, and their relative errors."""
    tensors, relative = {}, {}
    for projection in PROJECTIONS:
        residual = parts.residual(projection, expert, experts.matrix(projection, expert))
        result = vq_quantize(residual, settings.bits, settings.dim, settings.iters, settings.seed, backend)
        codebook = result.codebook.to(CODEBOOK_DTYPE)
        tensors[f"{projection}.codebook"] = codebook
        tensors[f"{projection}.indices"] = result.indices.to(torch.int16)
        approx = dequantize(result.indices, codebook.float(), residual.shape)
        relative[projection] = float((residual - approx).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-30))
    return tensors, {"relative_error": relative}
