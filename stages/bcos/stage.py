"""`kbvq bcos`: per expert, projection and output channel, the scale and shift of METHOD.md §4.

Shard `RUN/bcos/layer_NNN.safetensors`: `P.scale` and `P.shift` [E, oc] for each projection `P`
(`gate`, `up`, `down`), and `shared.P.scale` / `shared.P.shift` [oc] for a shared expert, stored in
float16 like the packed model. At inference `y = (1 + scale) * (What x) + shift`, on the projection's
own output: before the activation (gate, up) and before the routing weight (down).

Closed form (default): the statistics of `y = W x` and `yh = What x` over the expert's routed tokens
follow from calibrate's per-expert mean and covariance. `--propagate` takes `yh`'s inputs from a data
pass through the already-quantized earlier layers instead (see `stages.bcos.propagate`).
"""

from __future__ import annotations

import time

import torch

from kbvq_cli.console import info, progress_bar, warn
from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import PROJECTIONS, SHARED, LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_common import hashed_settings, open_stage, require_model, upstream_inputs
from kbvq_cli.stage_dir import layer_unit
from kbvq_cli.streaming import pick_device
from stages.bcos.core import InputMoments, bcos_correction, input_moments
from stages.calibrate.reader import Calibration, CalibrationLayer
from stages.klt_svd.reader import KltSvd
from stages.vq.reader import VqCodes, quantized_matrix

STAGE = "bcos"
STORE_DTYPE = torch.float16


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings = resolved.settings
    calibration, klt, codes = Calibration(resolved.run_dir), KltSvd(resolved.run_dir), VqCodes(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device)
    upstream = {"calibrate": calibration.stage_dir, "klt-svd": klt.stage_dir, "vq": codes.stage_dir}
    inputs = {"upstream": upstream_inputs(upstream), "model": source.fingerprint()}
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"bcos: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    started, layers = time.time(), klt.layers()
    if settings.propagate:
        from stages.bcos.propagate import run_propagated

        run_propagated(stage_dir, source, calibration, klt, codes, settings, device)
        return _finish(stage_dir, layers, time.time() - started)
    with progress_bar() as progress:
        task = progress.add_task("bcos layers", total=len(layers))
        for index in layers:
            name = layer_unit(index)
            if not stage_dir.has_unit(name):
                experts = layer_experts(source, index, torch.float32, device)
                quantized = quantized_layer(experts, klt, codes, index, device)
                stats = calibration.layer(index, device)
                tensors, metadata = correct_layer(experts, quantized, stats, settings)
                stage_dir.write_unit(name, tensors, {"layer": index, **metadata})
            progress.advance(task)
    return _finish(stage_dir, layers, time.time() - started)


def quantized_layer(experts: LayerExperts, klt: KltSvd, codes: VqCodes, index: int, device) -> dict:
    """(projection, expert) -> What [oc, ic] float32 for every expert of the layer."""
    parts, out = klt.layer(index, device), {}
    for expert in experts.expert_ids():
        unit = codes.expert(index, expert, device)
        for projection in PROJECTIONS:
            shape = tuple(experts.matrix(projection, expert).shape)
            out[(projection, expert)] = quantized_matrix(unit, parts, projection, expert, shape)
    return out


def expert_input_moments(stats: CalibrationLayer, experts: LayerExperts, expert, projection: str) -> InputMoments:
    """The full-precision input moments of one expert's projection (its routed tokens)."""
    moments = stats.expert_input(projection, expert, experts.shared_path)
    if moments.sum_xxT is None:
        raise KbvqError("closed-form BCOS needs per-expert second moments; rerun `kbvq calibrate --restart` with "
                        "expert_second_moments: true in the recipe")
    return input_moments(moments.sum_x, moments.sum_xxT, moments.count.sum())


def correct_layer(experts: LayerExperts, quantized: dict, stats: CalibrationLayer, settings) -> tuple[dict, dict]:
    tensors, starved, before, after, flat = {}, set(), [], [], 0
    for projection in PROJECTIONS:
        scales, shifts = [], []
        for expert in experts.expert_ids():
            full_moments = expert_input_moments(stats, experts, expert, projection)
            correction = bcos_correction(experts.matrix(projection, expert), quantized[(projection, expert)],
                                         full_moments, mode=settings.mode,
                                         min_tokens=settings.min_tokens, min_std_ratio=settings.min_std_ratio)
            if correction.starved:
                starved.add(str(expert))
            if correction.error_before is not None:
                before.append(correction.error_before)
                after.append(correction.error_after)
            flat += correction.flat_channels
            if expert == SHARED:
                tensors[f"{SHARED}.{projection}.scale"] = correction.scale.to(STORE_DTYPE)
                tensors[f"{SHARED}.{projection}.shift"] = correction.shift.to(STORE_DTYPE)
            else:
                scales.append(correction.scale)
                shifts.append(correction.shift)
        tensors[f"{projection}.scale"] = torch.stack(scales).to(STORE_DTYPE)
        tensors[f"{projection}.shift"] = torch.stack(shifts).to(STORE_DTYPE)
    metadata = {"starved": sorted(starved), "flat_channels": flat,
                "error_before": sum(before) / len(before) if before else None,
                "error_after": sum(after) / len(after) if after else None}
    return tensors, metadata


def _finish(stage_dir, layers: list[int], seconds: float) -> dict:
    metas = [stage_dir.read_metadata(layer_unit(i)) for i in layers]
    before = [m["error_before"] for m in metas if m["error_before"] is not None]
    after = [m["error_after"] for m in metas if m["error_after"] is not None]
    starved = {str(i): m["starved"] for i, m in zip(layers, metas) if m["starved"]}
    summary = {"layers": len(layers), "seconds": round(seconds, 3), "starved_experts": starved,
               "mean_relative_output_error_before": round(sum(before) / len(before), 6) if before else None,
               "mean_relative_output_error_after": round(sum(after) / len(after), 6) if after else None}
    stage_dir.finish(summary)
    if starved:
        warn(f"bcos: experts with fewer than the minimum tokens keep the identity correction: {starved}")
    if before:
        info(f"bcos: {len(layers)} layers in {seconds:.1f}s; mean relative output error "
             f"{summary['mean_relative_output_error_before']:.5f} -> {summary['mean_relative_output_error_after']:.5f}")
    else:
        info(f"bcos: {len(layers)} layers in {seconds:.1f}s")
    return summary
