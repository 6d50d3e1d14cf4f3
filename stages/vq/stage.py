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
from stages.calibrate.reader import Calibration
from stages.klt_svd.core import output_error
from stages.klt_svd.reader import KltSvd
from stages.vq.backends import make_backend
from stages.vq.core import dequantize, vq_quantize

STAGE = "vq"
CODEBOOK_DTYPE = torch.float16


def unit_name(layer: int, expert) -> str:
    return f"layer_{layer:03d}.{SHARED}" if expert == SHARED else f"layer_{layer:03d}.expert_{expert:03d}"


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
            for expert in todo:
                if expert in experts.expert_ids():
                    progress.update(task, description=f"vq layer {index} expert {expert}")
                    tensors, metadata = quantize_expert(experts, parts, stats, expert, settings, backend)
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


def _expert_ids(source: ModelSource) -> list:
    return list(range(source.num_experts)) + ([SHARED] if source.adapter.shared_experts else [])


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """`Tr(E C E^T) / Tr(W C W^T)`: the output MSE relative to the output energy on the calibration inputs."""
    error = output_error(weight - approx, second_moment)
    return float(error / output_error(weight, second_moment).clamp_min(1e-30))


def quantize_expert(experts, parts, stats, expert, settings, backend) -> tuple[dict, dict]:
    """The three projections of one expert: codebooks, indices, and their relative errors."""
    tensors, weight_error, before, after = {}, {}, {}, {}
    for projection in PROJECTIONS:
        weight = experts.matrix(projection, expert)
        residual = parts.residual(projection, expert, weight)
        result = vq_quantize(residual, settings.bits, settings.dim, settings.iters, settings.seed, backend)
        codebook = result.codebook.to(CODEBOOK_DTYPE)
        tensors[f"{projection}.codebook"] = codebook
        tensors[f"{projection}.indices"] = result.indices.to(torch.int16)
        approx = dequantize(result.indices, codebook.float(), residual.shape)
        weight_error[projection] = float((residual - approx).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-30))
        moments = stats.expert_input(projection, expert, experts.shared_path)
        second = moments.sum_xxT if moments.sum_xxT is not None and int(moments.count) > 0 else None
        second = second if second is not None else torch.eye(weight.shape[1], device=weight.device)
        share = weight - residual
        before[projection] = relative_output_error(weight, share, second)
        after[projection] = relative_output_error(weight, share + approx, second)
    return tensors, {"relative_error": weight_error, "output_error_before": before, "output_error": after}
