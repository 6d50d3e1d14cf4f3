"""`kbvq vq`: vector-quantize every expert matrix's specific part `W_spec = W - W_share`.

One unit per expert: `RUN/vq/layer_NNN.expert_EEE.safetensors` (and `layer_NNN.shared` for a shared
expert), in the schema of `stages.vq.reader.VqExpertUnit`. A 128-expert layer is hours of work on a
GPU, so a killed run resumes at the expert where it stopped.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kbvq_cli.console import progress_bar
from kbvq_cli.experts import PROJECTIONS, SHARED, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.output_error import vq_output_errors
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.streaming import pick_device
from kbvq_cli.units import expert_ids, expert_unit
from stages.calibrate.reader import Calibration
from stages.klt_svd.reader import KltSvd, budget_code_sizes, check_budget_code_size
from stages.vq.backends import make_backend
from stages.vq.batched import kmeans_batched
from stages.vq.core import codebook_size, dequantize, to_subvectors, vq_quantize
from stages.vq.config import VqSettings
from stages.vq.error_feedback import error_feedback_assign
from stages.vq.output_aware import output_aware, output_aware_codes
from stages.vq.reader import CODEBOOK_DTYPE, STAGE, VqExpertMeta, VqExpertUnit


def concrete_backend(settings: VqSettings) -> VqSettings:
    """`backend: auto` resolved: torch when the stage's device is CUDA (k-means on the GPU), else faiss."""
    if settings.backend != "auto":
        return settings
    return replace(settings, backend="torch" if pick_device(settings.device).startswith("cuda") else "faiss")


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    resolved.settings = settings = concrete_backend(resolved.settings)  # what is hashed is what runs
    calibration, klt = Calibration(resolved.run_dir), KltSvd(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device) if settings.backend == "torch" else "cpu"
    check_budget_code_size(resolved.run_dir, STAGE, bits=settings.bits, dim=settings.dim)  # before any write
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint(), compute=torch.device(device).type)
    if stage.complete:
        return stage.skip()
    backend, layers = make_backend(settings.backend), klt.layers()
    chosen = budget_code_sizes(resolved.run_dir) or {}  # a budget's code size per (layer, projection), if any
    all_experts = expert_ids(source.num_experts, bool(source.adapter.shared_experts))
    with progress_bar() as progress:
        task = progress.add_task("vq experts", total=len(layers) * len(all_experts))
        for index in layers:
            todo = [e for e in all_experts if not stage.dir.has_unit(expert_unit(index, e))]
            progress.advance(task, len(all_experts) - len(todo))
            if not todo:
                continue
            experts = layer_experts(source, index, torch.float32, device)
            parts, stats = klt.layer(index, device), calibration.layer(index, device)
            absent = [e for e in todo if e not in experts.expert_ids()]  # e.g. no shared expert in this layer
            progress.advance(task, len(absent))
            todo = [e for e in todo if e not in absent]
            groups = _groups(todo, settings.expert_batch if settings.backend == "torch" else 1)
            size = lambda g: sum(experts.parameters(e) for e in g)  # noqa: E731  (the shared expert weighs more)
            for group in stage.mine(groups, lambda g: expert_unit(index, g[0]), size):  # under torchrun
                progress.update(task, description=f"vq layer {index} expert {group[0]}")
                for unit, meta in quantize_group(experts, parts, stats, index, group, settings, backend,
                                                 chosen.get(index)):
                    stage.dir.write_unit(expert_unit(index, meta.expert), unit.to_tensors(), meta.to_json())
                    progress.advance(task)
    return _finish(stage, settings, len(layers), bool(chosen))


def _finish(stage: StageRun, settings: VqSettings, layers: int, chosen: bool = False) -> dict:
    stage.gather()  # under torchrun: every rank's units
    metas = [VqExpertMeta.from_json(stage.dir.read_metadata(name)) for name in stage.dir.unit_names()]
    mean = lambda key: sum(v for m in metas for v in getattr(m, key).values()) / max(3 * len(metas), 1)  # noqa: E731
    summary = {"layers": layers, "units": len(metas), "seconds": round(stage.seconds, 3),
               "mean_relative_output_error_shared_part_only": round(mean("output_error_before"), 6),
               "mean_relative_output_error": round(mean("output_error"), 6),
               "mean_relative_weight_error_of_residual": round(mean("relative_error"), 6)}
    size = "the bit budget's code sizes" if chosen else f"{settings.bits} bits (d={settings.dim})"
    return stage.finish(summary, (
        f"vq: {layers} layers, {len(metas)} experts in {stage.seconds:.1f}s at {size}; "
        f"mean relative output error {summary['mean_relative_output_error_shared_part_only']:.4f} with the "
        f"shared part alone -> {summary['mean_relative_output_error']:.4f} with VQ"))


def _groups(todo: list, size: int) -> list[list]:
    """Routed experts in groups of `size` (same shape, batched on the GPU); the shared expert alone."""
    routed = [e for e in todo if e != SHARED]
    groups = [routed[i:i + size] for i in range(0, len(routed), max(size, 1))]
    return groups + ([[SHARED]] if SHARED in todo else [])


def _codes(residuals: list[torch.Tensor], settings: VqSettings, backend) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(codebook float32 [K, d], indices [oc, ic/d]) per matrix: one by one, or batched on the torch backend."""
    same_shape = len({tuple(r.shape) for r in residuals}) == 1
    if settings.backend == "torch" and len(residuals) > 1 and same_shape:
        points = torch.stack([to_subvectors(r.float(), settings.dim) for r in residuals]).contiguous()
        codebooks, indices, _, _ = kmeans_batched(points, codebook_size(settings.bits, settings.dim),
                                                  settings.iters, settings.seed)
        return [(codebooks[i], indices[i].reshape(r.shape[0], -1)) for i, r in enumerate(residuals)]
    results = [vq_quantize(r, settings.bits, settings.dim, settings.iters, settings.seed, backend) for r in residuals]
    return [(result.codebook, result.indices) for result in results]


def quantize_group(experts, parts, stats, layer: int, group: list, settings: VqSettings, backend,
                   sizes: dict[str, tuple[int, int]] | None = None) -> list[tuple[VqExpertUnit, VqExpertMeta]]:
    """Quantize the experts in `group` (one layer): their units and metadata with their relative errors.
    `sizes` (a budget's): projection -> (bits, dim) in place of the settings' own."""
    codebooks, indices = {e: {} for e in group}, {e: {} for e in group}
    errors = {e: {"relative_error": {}, "output_error_before": {}, "output_error": {}} for e in group}
    every = settings
    for projection in PROJECTIONS:
        settings = replace(every, bits=sizes[projection][0], dim=sizes[projection][1]) if sizes else every
        weights = [experts.matrix(projection, expert) for expert in group]
        residuals = [parts.residual(projection, e, w) for e, w in zip(group, weights)]
        for expert, weight, residual, (codebook, codes) in zip(group, weights, residuals,
                                                               _codes(residuals, settings, backend)):
            codebook = codebook.to(CODEBOOK_DTYPE)
            moments = stats.expert_input(projection, expert, experts.shared_path)
            second = moments.sum_xxT if moments.sum_xxT is not None and int(moments.count) > 0 else None
            second = second if second is not None else torch.eye(weight.shape[1], device=weight.device)
            if output_aware(settings):  # fitted to Tr(E C E^T): stages/vq/output_aware.py
                codebook, codes = output_aware_codes(residual, codebook, codes, second, settings)
            elif settings.error_feedback:  # re-assign against the stored (16-bit) codebook, GPTVQ-style
                codes = error_feedback_assign(residual, codebook.float(), second, settings.damp)
            codebooks[expert][projection], indices[expert][projection] = codebook, codes
            approx = dequantize(codes, codebook.float(), residual.shape)
            found = errors[expert]
            found["relative_error"][projection] = float(
                (residual - approx).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-30))
            factors = parts.share_factors(projection, expert)
            factors = None if factors is None else tuple(f.to(weight.device) for f in factors)
            before, after = vq_output_errors(residual, approx, factors, second)
            found["output_error_before"][projection], found["output_error"][projection] = before, after
    return [(VqExpertUnit(codebooks[e], indices[e]), VqExpertMeta(layer, e, **errors[e])) for e in group]
