"""`kbvq gptq`: the RTN and GPTQ baselines (Table 1) on every expert matrix, straight from calibrate.

One unit per expert, named like vq's: `RUN/gptq/layer_NNN.expert_EEE.safetensors` (and
`layer_NNN.shared` for a shared expert) holding, for each projection `P` of `gate`, `up`, `down`:
`P.codes` uint8 [oc, ic], `P.scale` and `P.zero` float16 [oc, G] (stages/gptq/core.py has the format),
and `P.group_index` int32 [ic] with act_order in groups. GPTQ's Hessian of an expert matrix is the second
moment of that expert's own input over its routed tokens; an expert with no routed tokens (or a run
calibrated without per-expert second moments) falls back to the pooled one (the MoE block input for
`gate`/`up`, the routed experts' pooled `down` input) and is marked `starved`. The shared expert uses the
block input and its own `down` input. RTN reads the moments only to report the output error.
The metadata has each projection's relative output error `Tr(E C E^T) / Tr(W C W^T)` under that same
second moment, and the unit's storage bits.
"""

from __future__ import annotations

import time

import torch

from kbvq_cli.console import info, progress_bar
from kbvq_cli.experts import PROJECTIONS, SHARED, LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_common import hashed_settings, open_stage, require_model, upstream_inputs
from kbvq_cli.stage_dir import layer_unit
from kbvq_cli.streaming import pick_device
from stages.calibrate.reader import Calibration, CalibrationLayer
from stages.gptq.core import QuantizedLinear, dequantize, gptq_bits, quantize_scalar
from stages.vq.stage import relative_output_error, unit_name

STAGE = "gptq"


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings = resolved.settings
    calibration = Calibration(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device)
    # CPU and CUDA round the float32 updates differently: where it ran is part of what it computed
    inputs = {"upstream": upstream_inputs({"calibrate": calibration.stage_dir}), "model": source.fingerprint(),
              "compute": torch.device(device).type}
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"gptq: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    layers = [i for i in range(source.num_layers) if calibration.stage_dir.read_metadata(layer_unit(i))["moe"]]
    expert_ids = list(range(source.num_experts)) + ([SHARED] if source.adapter.shared_experts else [])
    started = time.time()
    with progress_bar() as progress:
        task = progress.add_task(f"{settings.method} experts", total=len(layers) * len(expert_ids))
        for index in layers:
            todo = [e for e in expert_ids if not stage_dir.has_unit(unit_name(index, e))]
            progress.advance(task, len(expert_ids) - len(todo))
            if not todo:
                continue
            experts = layer_experts(source, index, torch.float32, device)
            stats = calibration.layer(index, device)
            for expert in todo:
                progress.update(task, description=f"{settings.method} layer {index} expert {expert}")
                if expert in experts.expert_ids():  # e.g. no shared expert in this layer
                    tensors, metadata = quantize_expert(experts, stats, expert, settings)
                    stage_dir.write_unit(unit_name(index, expert), tensors, {"layer": index, "expert": expert,
                                                                             **metadata})
                progress.advance(task)
    return _finish(stage_dir, settings, len(layers), time.time() - started)


def quantize_expert(experts: LayerExperts, stats: CalibrationLayer, expert, settings) -> tuple[dict, dict]:
    """All projections of one expert: (tensors for its unit, metadata)."""
    tensors, errors, starved, stored_bits, weights = {}, {}, False, 0, 0
    for projection in PROJECTIONS:
        weight = experts.matrix(projection, expert)
        hessian, fallback = expert_hessian(stats, projection, expert, experts.shared_path)
        starved = starved or fallback
        q = quantize_scalar(weight, hessian, settings.method, settings.bits, settings.group_size, settings.damp,
                            settings.act_order, settings.block_size, settings.symmetric)
        tensors.update(stored_tensors(q, projection))
        errors[projection] = relative_output_error(weight, dequantize(q), hessian)
        total, count = gptq_bits(*weight.shape, settings.bits, settings.group_size)
        stored_bits, weights = stored_bits + total, weights + count
    tokens = int(stats.expert_input("gate", expert, experts.shared_path).count.sum())
    return tensors, {"output_error": errors, "starved": starved, "tokens": tokens,
                     "storage_bits": stored_bits, "weights": weights}


def stored_tensors(q: QuantizedLinear, key: str) -> dict[str, torch.Tensor]:
    """How a unit stores one quantized matrix: `key.codes`, `key.scale`, `key.zero` (and `key.group_index`)."""
    tensors = {f"{key}.codes": q.codes, f"{key}.scale": q.scale, f"{key}.zero": q.zero}
    if q.group_index is not None:
        tensors[f"{key}.group_index"] = q.group_index
    return tensors


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


def _finish(stage_dir, settings, layers: int, seconds: float) -> dict:
    metas = [stage_dir.read_metadata(name) for name in stage_dir.unit_names()]
    errors = [value for meta in metas for value in meta["output_error"].values()]
    starved = [f"{meta['layer']}.{meta['expert']}" for meta in metas if meta["starved"]]
    bits = sum(meta["storage_bits"] for meta in metas) / max(sum(meta["weights"] for meta in metas), 1)
    summary = {"layers": layers, "units": len(metas), "seconds": round(seconds, 3),
               "mean_relative_output_error": round(sum(errors) / max(len(errors), 1), 6),
               "bits_per_expert_weight": round(bits, 4), "starved": starved}
    stage_dir.finish(summary)
    grouping = f"groups of {settings.group_size}" if settings.group_size else "per channel"
    info(f"gptq: {layers} layers, {len(metas)} experts in {seconds:.1f}s, {settings.method} at {settings.bits} bits "
         f"({grouping}, {bits:.3f} bits per weight stored); mean relative output error "
         f"{summary['mean_relative_output_error']:.4f}" + (f"; {len(starved)} starved expert(s) used the pooled "
                                                          f"statistics" if starved else ""))
    return summary
