"""`kbvq gptq`: the RTN and GPTQ baselines (Table 1) on every expert matrix, straight from calibrate.

One unit per expert, named like vq's: `RUN/gptq/layer_NNN.expert_EEE.safetensors` (and
`layer_NNN.shared` for a shared expert) holding, for each projection `P` of `gate`, `up`, `down`:
`P.codes` uint8 [oc, ic], `P.scale` and `P.zero` float16 [oc, G] (the schema of `stages.gptq.reader.ScalarExpertUnit`),
and `P.group_index` int32 [ic] with act_order in groups. GPTQ's Hessian of an expert matrix is the second
moment of that expert's own input over its routed tokens; an expert with no routed tokens (or a run
calibrated without per-expert second moments) falls back to the pooled one (the MoE block input for
`gate`/`up`, the routed experts' pooled `down` input) and is marked `starved`. The shared expert uses the
block input and its own `down` input. RTN reads the moments only to report the output error.
The metadata has each projection's relative output error `Tr(E C E^T) / Tr(W C W^T)` under that same
second moment, and the unit's storage bits.
"""

from __future__ import annotations

import torch

from kbvq_cli.console import progress_bar
from kbvq_cli.experts import PROJECTIONS, LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.output_error import relative_output_error
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.scalar_quant import dequantize, gptq_bits, quantize_scalar
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.streaming import pick_device
from kbvq_cli.units import expert_ids, expert_unit
from stages.calibrate.reader import Calibration, CalibrationLayer
from stages.gptq.config import GptqSettings
from stages.gptq.reader import STAGE, ScalarExpertMeta, ScalarExpertUnit


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings: GptqSettings = resolved.settings
    calibration = Calibration(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device)
    # CPU and CUDA round the float32 updates differently: where it ran is part of what it computed
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint(), compute=torch.device(device).type)
    if stage.complete:
        return stage.skip()
    layers = [i for i in range(source.num_layers) if calibration.layer_is_moe(i)]
    all_experts = expert_ids(source.num_experts, bool(source.adapter.shared_experts))
    with progress_bar() as progress:
        task = progress.add_task(f"{settings.method} experts", total=len(layers) * len(all_experts))
        for index in layers:
            todo = [e for e in all_experts if not stage.dir.has_unit(expert_unit(index, e))]
            progress.advance(task, len(all_experts) - len(todo))
            if not todo:
                continue
            experts = layer_experts(source, index, torch.float32, device)
            stats = calibration.layer(index, device)
            absent = [e for e in todo if e not in experts.expert_ids()]  # e.g. no shared expert in this layer
            progress.advance(task, len(absent))  # on every rank: rank 0's bar counts them too
            todo = [e for e in todo if e not in absent]
            for expert in stage.mine(todo, lambda e: expert_unit(index, e), experts.parameters):  # under torchrun
                progress.update(task, description=f"{settings.method} layer {index} expert {expert}")
                unit, meta = quantize_expert(experts, stats, index, expert, settings)
                stage.dir.write_unit(expert_unit(index, expert), unit.to_tensors(), meta.to_json())
                progress.advance(task)
    return _finish(stage, settings, len(layers))


def quantize_expert(experts: LayerExperts, stats: CalibrationLayer, layer: int, expert, settings: GptqSettings
                    ) -> tuple[ScalarExpertUnit, ScalarExpertMeta]:
    """All projections of one expert: its unit and metadata."""
    matrices, errors, starved, stored_bits, weights = {}, {}, False, 0, 0
    for projection in PROJECTIONS:
        weight = experts.matrix(projection, expert)
        hessian, fallback = expert_hessian(stats, projection, expert, experts.shared_path)
        starved = starved or fallback
        q = quantize_scalar(weight, hessian, settings.method, settings.bits, settings.group_size, settings.damp,
                            settings.act_order, settings.block_size, settings.symmetric)
        matrices[projection] = q
        errors[projection] = relative_output_error(weight, dequantize(q), hessian)
        total, count = gptq_bits(*weight.shape, settings.bits, settings.group_size)
        stored_bits, weights = stored_bits + total, weights + count
    tokens = int(stats.expert_input("gate", expert, experts.shared_path).count.sum())
    return ScalarExpertUnit(matrices), ScalarExpertMeta(layer, expert, errors, starved, tokens, stored_bits, weights)


def expert_hessian(stats: CalibrationLayer, projection: str, expert, shared_path: str | None
                   ) -> tuple[torch.Tensor, bool]:
    """(second moment of the expert's `projection` input, float64 [ic, ic]; True if it is the pooled
    fallback because the expert saw no tokens or calibrate kept no per-expert second moments)."""
    moments = stats.expert_input(projection, expert, shared_path)
    if moments.sum_xxT is not None and int(moments.count.sum()) > 0:
        return moments.second_moment(), False
    if projection == "down":
        return stats.pooled_down_second_moment(), True
    return stats.input_moments("block").second_moment(), True


def _finish(stage: StageRun, settings: GptqSettings, layers: int) -> dict:
    stage.gather()  # under torchrun: every rank's units
    metas = [ScalarExpertMeta.from_json(stage.dir.read_metadata(name)) for name in stage.dir.unit_names()]
    errors = [value for meta in metas for value in meta.output_error.values()]
    starved = [f"{meta.layer}.{meta.expert}" for meta in metas if meta.starved]
    bits = sum(meta.storage_bits for meta in metas) / max(sum(meta.weights for meta in metas), 1)
    summary = {"layers": layers, "units": len(metas), "seconds": round(stage.seconds, 3),
               "mean_relative_output_error": round(sum(errors) / max(len(errors), 1), 6),
               "bits_per_expert_weight": round(bits, 4), "starved": starved}
    grouping = f"groups of {settings.group_size}" if settings.group_size else "per channel"
    return stage.finish(summary, (
        f"gptq: {layers} layers, {len(metas)} experts in {stage.seconds:.1f}s, {settings.method} at {settings.bits} "
        f"bits ({grouping}, {bits:.3f} bits per weight stored); mean relative output error "
        f"{summary['mean_relative_output_error']:.4f}" + (f"; {len(starved)} starved expert(s) used the pooled "
                                                          f"statistics" if starved else "")))
