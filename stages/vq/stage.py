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
from kbvq_cli.stage_dir import layer_unit
from kbvq_cli.streaming import pick_device
from stages.calibrate.reader import Calibration
from stages.klt_svd.core import output_error
from stages.klt_svd.reader import KltSvd
from stages.vq.backends import make_backend
from stages.vq.batched import kmeans_batched
from stages.vq.core import codebook_size, dequantize, to_subvectors, vq_quantize
from stages.vq.error_feedback import error_feedback_assign

STAGE = "vq"
CODEBOOK_DTYPE = torch.float16


def unit_name(layer: int, expert) -> str:
    return f"{layer_unit(layer)}.{SHARED}" if expert == SHARED else f"{layer_unit(layer)}.expert_{expert:03d}"


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings = resolved.settings
    calibration, klt = Calibration(resolved.run_dir), KltSvd(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device) if settings.backend == "torch" else "cpu"
    upstream = upstream_inputs({"calibrate": calibration.stage_dir, "klt-svd": klt.stage_dir})
    inputs = {"upstream": upstream, "model": source.fingerprint(), "compute": torch.device(device).type}
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"vq: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    backend, started, layers = make_backend(settings.backend), time.time(), klt.layers()
    with progress_bar() as progress:
        task = progress.add_task("vq experts", total=len(layers) * len(_expert_ids(source)))
        for index in layers:
            todo = [e for e in _expert_ids(source) if not stage_dir.has_unit(unit_name(index, e))]
            progress.advance(task, len(_expert_ids(source)) - len(todo))
            if not todo:
                continue
            experts = layer_experts(source, index, torch.float32, device)
            parts, stats = klt.layer(index, device), calibration.layer(index, device)
            absent = [e for e in todo if e not in experts.expert_ids()]  # e.g. no shared expert in this layer
            progress.advance(task, len(absent))
            todo = [e for e in todo if e not in absent]
            for group in _groups(todo, settings.expert_batch if settings.backend == "torch" else 1):
                progress.update(task, description=f"vq layer {index} expert {group[0]}")
                for expert, tensors, metadata in quantize_group(experts, parts, stats, group, settings, backend):
                    stage_dir.write_unit(unit_name(index, expert), tensors, {"layer": index, "expert": expert,
                                                                             **metadata})
                    progress.advance(task)
    return _finish(stage_dir, settings, len(layers), time.time() - started)


def _finish(stage_dir, settings, layers: int, seconds: float) -> dict:
    metas = [stage_dir.read_metadata(name) for name in stage_dir.unit_names()]
    mean = lambda key: sum(v for m in metas for v in m[key].values()) / max(3 * len(metas), 1)  # noqa: E731
    summary = {"layers": layers, "units": len(metas), "seconds": round(seconds, 3),
               "mean_relative_output_error_shared_part_only": round(mean("output_error_before"), 6),
               "mean_relative_output_error": round(mean("output_error"), 6),
               "mean_relative_weight_error_of_residual": round(mean("relative_error"), 6)}
    stage_dir.finish(summary)
    info(f"vq: {layers} layers, {len(metas)} experts in {seconds:.1f}s at {settings.bits} bits (d={settings.dim}); "
         f"mean relative output error {summary['mean_relative_output_error_shared_part_only']:.4f} with the "
         f"shared part alone -> {summary['mean_relative_output_error']:.4f} with VQ")
    return summary


def _groups(todo: list, size: int) -> list[list]:
    """Routed experts in groups of `size` (same shape, batched on the GPU); the shared expert alone."""
    routed = [e for e in todo if e != SHARED]
    groups = [routed[i:i + size] for i in range(0, len(routed), max(size, 1))]
    return groups + ([[SHARED]] if SHARED in todo else [])


def _expert_ids(source: ModelSource) -> list:
    return list(range(source.num_experts)) + ([SHARED] if source.adapter.shared_experts else [])


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """`Tr(E C E^T) / Tr(W C W^T)`: the output MSE relative to the output energy on the calibration inputs."""
    error = output_error(weight - approx, second_moment)
    return float(error / output_error(weight, second_moment).clamp_min(1e-30))


def _codes(residuals: list[torch.Tensor], settings, backend) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(codebook float32 [K, d], indices [oc, ic/d]) per matrix: one by one, or batched on the torch backend."""
    same_shape = len({tuple(r.shape) for r in residuals}) == 1
    if settings.backend == "torch" and len(residuals) > 1 and same_shape:
        points = torch.stack([to_subvectors(r.float(), settings.dim) for r in residuals]).contiguous()
        codebooks, indices, _, _ = kmeans_batched(points, codebook_size(settings.bits, settings.dim),
                                                  settings.iters, settings.seed)
        return [(codebooks[i], indices[i].reshape(r.shape[0], -1)) for i, r in enumerate(residuals)]
    results = [vq_quantize(r, settings.bits, settings.dim, settings.iters, settings.seed, backend) for r in residuals]
    return [(result.codebook, result.indices) for result in results]


def quantize_group(experts, parts, stats, group: list, settings, backend) -> list[tuple[object, dict, dict]]:
    """Quantize the experts in `group` (one layer): [(expert, tensors, metadata)] with their relative errors."""
    out = {expert: ({}, {"relative_error": {}, "output_error_before": {}, "output_error": {}}) for expert in group}
    for projection in PROJECTIONS:
        weights = [experts.matrix(projection, expert) for expert in group]
        residuals = [parts.residual(projection, e, w) for e, w in zip(group, weights)]
        for expert, weight, residual, (codebook, indices) in zip(group, weights, residuals,
                                                                 _codes(residuals, settings, backend)):
            tensors, metadata = out[expert]
            codebook = codebook.to(CODEBOOK_DTYPE)
            moments = stats.expert_input(projection, expert, experts.shared_path)
            second = moments.sum_xxT if moments.sum_xxT is not None and int(moments.count) > 0 else None
            second = second if second is not None else torch.eye(weight.shape[1], device=weight.device)
            if settings.error_feedback:  # re-assign against the stored (16-bit) codebook, GPTVQ-style
                indices = error_feedback_assign(residual, codebook.float(), second, settings.damp)
            tensors[f"{projection}.codebook"] = codebook
            tensors[f"{projection}.indices"] = indices.to(torch.int16)
            approx = dequantize(indices, codebook.float(), residual.shape)
            metadata["relative_error"][projection] = float(
                (residual - approx).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-30))
            share = weight - residual
            metadata["output_error_before"][projection] = relative_output_error(weight, share, second)
            metadata["output_error"][projection] = relative_output_error(weight, share + approx, second)
    return [(expert, *out[expert]) for expert in group]
