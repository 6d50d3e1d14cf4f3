"""`kbvq bcos`: per expert, projection and output channel, the scale and shift of docs/method.md §4.

Shard `RUN/bcos/layer_NNN.safetensors`: `P.scale` and `P.shift` [E, oc] for each projection `P`
(`gate`, `up`, `down`), and `shared.P.scale` / `shared.P.shift` [oc] for a shared expert, stored in
float16 like the packed model. At inference `y = (1 + scale) * (What x) + shift`, on the projection's
own output: before the activation (gate, up) and before the routing weight (down).

Closed form (default): the statistics of `y = W x` and `yh = What x` over the expert's routed tokens
follow from calibrate's per-expert mean and covariance. `--propagate` takes `yh`'s inputs from a data
pass through the already-quantized earlier layers instead (see `stages.bcos.propagate`).
"""

from __future__ import annotations

from typing import Callable

import torch

from kbvq_cli.console import progress_bar, warn
from kbvq_cli.experts import PROJECTIONS, SHARED, LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.streaming import pick_device
from kbvq_cli.units import layer_unit
from stages.bcos.config import BcosSettings
from stages.bcos.core import BcosCorrection, bcos_correction, product_dtype
from stages.bcos.parallel import propagation_blocks
from stages.bcos.propagate import run_propagated
from stages.bcos.reader import STAGE, BcosLayerMeta, BcosLayerUnit, Correction
from stages.calibrate.reader import Calibration, CalibrationLayer
from stages.klt_svd.reader import KltSvd, check_budget_code_size
from stages.vq.reader import VqCodes


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings: BcosSettings = resolved.settings
    calibration, klt, codes = Calibration(resolved.run_dir), KltSvd(resolved.run_dir), VqCodes(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    device = pick_device(settings.device)
    blocks = propagation_blocks(calibration) if settings.propagate else None  # refused before any write
    check_budget_code_size(resolved.run_dir, STAGE, corrected=settings.mode != "none")
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint())
    if stage.complete:
        return stage.skip()
    layers = klt.layers()
    if settings.propagate:
        run_propagated(stage.dir, source, calibration, klt, codes, settings, device, blocks)
        return _finish(stage, layers)
    with progress_bar() as progress:
        task = progress.add_task("bcos layers", total=len(layers))
        for index in stage.mine(layers, layer_unit):  # under torchrun, this rank's layers
            name = layer_unit(index)
            if not stage.dir.has_unit(name):
                experts = layer_experts(source, index, torch.float32, device)
                quantized = codes.quantized_matrices(experts, klt, index, device)
                unit, meta = correct_layer(experts, quantized, calibration.layer(index, device), index, settings)
                stage.dir.write_unit(name, unit.to_tensors(), meta.to_json())
            progress.advance(task)
    return _finish(stage, layers)


def correct_layer(experts: LayerExperts, quantized: Callable[[str, object], torch.Tensor], stats: CalibrationLayer,
                  index: int, settings: BcosSettings) -> tuple[BcosLayerUnit, BcosLayerMeta]:
    """Closed-form corrections of every expert projection of one MoE layer.

    `quantized(projection, expert)` -> What [oc, ic] (`stages.vq.reader.QuantizedMatrices`). Expert by
    expert, each What and input covariance dropped once used: at most one of each is alive, and the
    expert's gate and up share one decoded second moment. The covariance is built in the precision of
    the product it feeds (`product_dtype`: float32 for the stage's float32 weights), the values the
    float64 one was cast to (`kbvq_cli.moments.input_moments`). A Mixtral layer's What of every expert
    at once and its float64 moments peaked at 24 GB.
    """
    corrections = {(projection, expert): _correct(experts, quantized, stats, projection, expert, settings)
                   for expert in experts.expert_ids() for projection in PROJECTIONS}
    return _layer_unit(experts, corrections, index)


def _correct(experts: LayerExperts, quantized, stats: CalibrationLayer, projection: str, expert,
             settings: BcosSettings) -> BcosCorrection:
    """One projection's correction; its What and moments are freed on return, before the next is built."""
    weight, approx = experts.matrix(projection, expert), quantized(projection, expert)
    moments = stats.expert_input_moments(expert, projection, experts.shared_path, product_dtype(weight, approx))
    return bcos_correction(weight, approx, moments, mode=settings.mode, min_tokens=settings.min_tokens,
                           min_std_ratio=settings.min_std_ratio)


def _layer_unit(experts: LayerExperts, corrections: dict, index: int) -> tuple[BcosLayerUnit, BcosLayerMeta]:
    """The shard and metadata of one layer's `(projection, expert) -> BcosCorrection`, the mean errors
    summed projection by projection (the order the metadata has always been summed in)."""
    routed, shared, starved, before, after, flat = {}, {}, set(), [], [], 0
    for projection in PROJECTIONS:
        scales, shifts = [], []
        for expert in experts.expert_ids():
            correction = corrections[(projection, expert)]
            if correction.starved:
                starved.add(str(expert))
            if correction.error_before is not None:
                before.append(correction.error_before)
                after.append(correction.error_after)
            flat += correction.flat_channels
            if expert == SHARED:
                shared[projection] = Correction(correction.scale, correction.shift)
            else:
                scales.append(correction.scale)
                shifts.append(correction.shift)
        routed[projection] = Correction(torch.stack(scales), torch.stack(shifts))
    meta = BcosLayerMeta(index, sorted(starved), flat, sum(before) / len(before) if before else None,
                         sum(after) / len(after) if after else None)
    return BcosLayerUnit(routed, shared), meta


def _finish(stage: StageRun, layers: list[int]) -> dict:
    stage.gather()  # under torchrun: every rank's units
    metas = [BcosLayerMeta.from_json(stage.dir.read_metadata(layer_unit(i))) for i in layers]
    before = [m.error_before for m in metas if m.error_before is not None]
    after = [m.error_after for m in metas if m.error_after is not None]
    starved = {str(m.layer): m.starved for m in metas if m.starved}
    seconds = stage.seconds
    summary = {"layers": len(layers), "seconds": round(seconds, 3), "starved_experts": starved,
               "mean_relative_output_error_before": round(sum(before) / len(before), 6) if before else None,
               "mean_relative_output_error_after": round(sum(after) / len(after), 6) if after else None}
    if starved:
        warn(f"bcos: experts with fewer than the minimum tokens keep the identity correction: {starved}")
    message = f"bcos: {len(layers)} layers in {seconds:.1f}s"
    if before:
        message += (f"; mean relative output error {summary['mean_relative_output_error_before']:.5f} -> "
                    f"{summary['mean_relative_output_error_after']:.5f}")
    return stage.finish(summary, message)
