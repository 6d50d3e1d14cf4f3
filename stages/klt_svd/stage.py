"""`kbvq klt-svd`: per MoE layer and projection, the shared basis and expert coefficients (IDRE).

Shard `RUN/klt-svd/layer_NNN.safetensors`, for each decomposed part `P` (`gate`, `up`, `down`, and
`shared.down` for a shared expert's own down projection):
- `P.shared_basis` and `P.expert_coeffs` ([E, oc, k] input side, [E, k, ic] output side), stored in
  16 bits: the values the packed model will hold, so `vq` quantizes the residual left by exactly them;
- `P.shared_expert_coeffs` ([Is, k]) where the shared expert is stacked with the routed ones;
- `P.singular_values`, `P.rho` (float32) for reports (Fig. 5): the whole spectrum, or its leading `rank`
  entries for an input wider than `core.LEADING_ONLY_ABOVE` decomposed at a fixed rank.
The metadata records each part's side, rank, rho_k and whether the KLT was used.
"""

from __future__ import annotations

import time

import torch

from kbvq_cli.console import progress_bar
from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import SHARED, LayerExperts, layer_experts
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.units import layer_unit
from kbvq_cli.streaming import pick_device
from stages.calibrate.reader import Calibration, CalibrationLayer
from stages.klt_svd.config import KltSvdSettings
from stages.klt_svd.core import damped_klt, decompose, select_rank
from stages.klt_svd.budget import budget_plan
from stages.klt_svd.rank_limit import check_rank_fits
from stages.klt_svd.reader import KltLayerMeta, PartMeta, read_layer_meta

STAGE = "klt-svd"
STORE_DTYPE = torch.float16


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings: KltSvdSettings = resolved.settings
    calibration = Calibration(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    check_rank_fits(source, settings)  # before anything is written: refused, the run is left as it was
    device = pick_device(settings.device)
    moe_layers = [i for i in range(source.num_layers) if calibration.layer_is_moe(i)]
    budget = budget_plan(resolved, source, settings, len(moe_layers))  # None without --target-bits
    inputs = {"budget_code_size": budget.code.to_json()} if budget else {}
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint(), **inputs)
    if stage.complete:
        return stage.skip()
    chooser = budget.chooser(stage, moe_layers, source, calibration, device, decompose_layer) if budget else None
    with progress_bar() as progress:
        task = progress.add_task("klt-svd layers", total=len(moe_layers))
        for index in stage.mine(moe_layers, layer_unit):  # under torchrun, this rank's layers
            name = layer_unit(index)
            if not stage.dir.has_unit(name):
                # without the per-expert moments klt-svd never reads (1.6 GB at Mixtral), before the experts load
                stats = calibration.layer(index, device).without_expert_moments()
                experts = layer_experts(source, index, torch.float32, device)
                tensors, parts = decompose_layer(experts, stats, settings, chooser(index) if chooser else None)
                del experts, stats
                stage.dir.write_unit(name, tensors, KltLayerMeta(index, parts).to_json())
            progress.advance(task)
    stage.gather()
    captured = [part.rho_k for index in moe_layers for part in read_layer_meta(stage.dir, index).parts.values()]
    mean_rho = sum(captured) / max(len(captured), 1)
    summary = {"layers": len(moe_layers), "seconds": round(stage.seconds, 3), "mean_rho_k": round(mean_rho, 6),
               "mean_relative_output_error_of_shared_part": round(1 - mean_rho, 6)}
    if budget:
        summary["budget"] = stage.dir.manifest["state"]["budget"]
    return stage.finish(summary, f"klt-svd: {len(moe_layers)} MoE layers in {stage.seconds:.1f}s; the shared parts "
                                 f"hold {100 * mean_rho:.1f}% of the mapped weights' energy (mean rho_k), leaving "
                                 f"{100 * (1 - mean_rho):.1f}% to VQ")


def _decompose(weights: list[torch.Tensor], klt, settings: KltSvdSettings, side: str = "input", part: str = "",
               choose=None):
    """`decompose` with the settings' rank (fixed up front unless it is chosen by energy), or with
    `choose(part, oc, ic)`'s chooser (a bit budget's, which may read the whole spectrum)."""
    oc, ic = weights[0].shape
    if choose is not None:
        return decompose(weights, klt, choose(part, oc, ic), side=side)

    def choose(rho):
        return select_rank(rho, oc, ic, rank_ratio=settings.rank_ratio, rank=settings.rank, energy=settings.energy)

    # a ratio or an absolute rank never reads rho's values, only its length (ic on the column route)
    fixed = None if settings.energy is not None else choose(torch.ones(ic, dtype=torch.float64))
    return decompose(weights, klt, choose, side=side, fixed_rank=fixed)


def decompose_layer(experts: LayerExperts, stats: CalibrationLayer, settings: KltSvdSettings, choose=None
                    ) -> tuple[dict, dict[str, PartMeta]]:
    """All decomposed parts of one MoE layer: (tensors for the shard, part -> how it was decomposed).
    `choose(part, oc, ic)` gives each part's rank chooser (a bit budget's); by default the settings'.

    Consumes `experts`' routed gate and up once decomposed: at Mixtral they are 3.8 GB of float32
    the down decomposition does not need beside its own 1.6 GB matrices."""
    tensors, parts = {}, {}
    gate_up_klt = None
    if settings.klt:  # second moments come as fresh float64 tensors: damped in place
        gate_up_klt = damped_klt(stats.input_moments("block").second_moment(), settings.damp, overwrite=True)
    for projection in ("gate", "up"):
        weights = list(experts.routed[projection])
        stack_shared = bool(experts.shared) and settings.include_shared_experts
        if stack_shared:
            weights.append(experts.shared[projection])
        result = _decompose(weights, gate_up_klt, settings, part=projection, choose=choose)
        del weights
        routed_coeffs = result.expert_coeffs[: experts.num_experts]
        _store(tensors, parts, projection, result, routed_coeffs, settings.klt)
        if stack_shared:
            tensors[f"{projection}.shared_expert_coeffs"] = _to_store(result.expert_coeffs[-1])
        del result, routed_coeffs
    del gate_up_klt, experts.routed["gate"], experts.routed["up"]
    if settings.down != "off":
        weights = list(experts.routed["down"])
        if settings.down == "pooled":
            klt = damped_klt(stats.pooled_down_second_moment(), settings.damp, overwrite=True) if settings.klt else None
            result = _decompose(weights, klt, settings, part="down", choose=choose)
            del klt
        else:
            result = _decompose(weights, None, settings, side="output", part="down", choose=choose)
        _store(tensors, parts, "down", result, result.expert_coeffs, settings.klt and settings.down == "pooled")
        del weights, result
        if experts.shared:
            _decompose_shared_down(tensors, parts, experts, stats, settings, choose)
    return tensors, parts


def _decompose_shared_down(tensors, parts, experts: LayerExperts, stats: CalibrationLayer,
                           settings: KltSvdSettings, choose=None) -> None:
    """A shared expert's down input is its own activation space: decomposed alone, with its own KLT."""
    klt = None
    if settings.klt:
        moment = stats.input_moments(f"linear.{experts.shared_path}.down_proj").second_moment()
        klt = damped_klt(moment, settings.damp, overwrite=True)
    result = _decompose([experts.shared["down"]], klt, settings, part=f"{SHARED}.down", choose=choose)
    _store(tensors, parts, f"{SHARED}.down", result, result.expert_coeffs, settings.klt)


def _to_store(tensor: torch.Tensor) -> torch.Tensor:
    stored = tensor.to(STORE_DTYPE)
    if not torch.isfinite(stored).all():
        raise KbvqError("a shared basis or coefficient overflows float16; this model needs a bfloat16 store "
                        "(not supported yet): use --rank 0 for plain VQ")
    return stored


def _store(tensors: dict, parts: dict, name: str, result, coeffs: list, klt_used: bool) -> None:
    tensors[f"{name}.shared_basis"] = _to_store(result.shared_basis)
    tensors[f"{name}.expert_coeffs"] = _to_store(torch.stack(coeffs))
    tensors[f"{name}.singular_values"] = result.singular_values.float()
    tensors[f"{name}.rho"] = result.rho.float()
    rho_k = float(result.rho[result.rank - 1]) if result.rank > 0 else 0.0
    parts[name] = PartMeta(result.side, result.rank, rho_k, klt_used)
