"""`kbvq nonexpert`: RTN/GPTQ of the linear layers outside the experts (attention by default).

One unit per decoder layer, `RUN/nonexpert/layer_NNN.safetensors`, in the schema of
`stages.nonexpert.reader` (one RTN/GPTQ matrix per quantized linear); GPTQ's Hessian is that
linear's input second moment from calibrate.
With `method: none` (the default) the stage finishes at once with no units: nothing is quantized.
"""

from __future__ import annotations

from kbvq_cli.console import progress_bar
from kbvq_cli.model_files import ModelSource
from kbvq_cli.output_error import relative_output_error
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.scalar_quant import QuantizedLinear, dequantize, gptq_bits, quantize_scalar
from kbvq_cli.stage_run import StageRun, require_model
from kbvq_cli.units import layer_unit
from stages.calibrate.reader import Calibration
from stages.nonexpert.config import NonExpertSettings
from stages.nonexpert.reader import STAGE, LinearMeta, NonExpertLayerMeta, layer_tensors


def chosen_linears(source: ModelSource, state: dict, prefixes: tuple[str, ...]) -> list[str]:
    """Module paths of the layer's 2D `*.weight` tensors under `prefixes`, never the router, the experts,
    a shared expert or a shared-expert gate (those are the expert stages' or stay as they are)."""
    adapter = source.adapter
    excluded = (adapter.router, adapter.experts, *adapter.shared_experts, f"{adapter.moe_block}.shared_expert_gate")
    paths = []
    for name, tensor in state.items():
        path = name.removesuffix(".weight")
        if not name.endswith(".weight") or tensor.dim() != 2 or _under(path, excluded):
            continue
        if _under(path, prefixes):
            paths.append(path)
    return sorted(paths)


def _under(path: str, prefixes) -> bool:
    """Is `path` one of the module paths or inside one (`mlp.gate` does not contain `mlp.gate_proj`)?"""
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings: NonExpertSettings = resolved.settings
    calibration = Calibration(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint())
    if stage.complete:
        return stage.skip()
    if settings.method != "none":
        with progress_bar() as progress:
            task = progress.add_task("nonexpert layers", total=source.num_layers)
            for index in stage.mine(list(range(source.num_layers)), layer_unit):  # under torchrun
                if not stage.dir.has_unit(layer_unit(index)):
                    matrices, meta = quantize_layer(source, calibration, index, settings)
                    stage.dir.write_unit(layer_unit(index), layer_tensors(matrices), meta.to_json())
                progress.advance(task)
    return _finish(stage, settings)


def quantize_layer(source: ModelSource, calibration: Calibration, index: int, settings: NonExpertSettings
                   ) -> tuple[dict[str, QuantizedLinear], NonExpertLayerMeta]:
    state, stats = source.layer_state_dict(index), calibration.layer(index)
    matrices, linears = {}, {}
    for path in chosen_linears(source, state, settings.modules):
        weight = state[f"{path}.weight"].float()
        hessian = stats.input_moments(f"linear.{path}").second_moment()
        q = quantize_scalar(weight, hessian, settings.method, settings.bits, settings.group_size, settings.damp,
                            settings.act_order)
        matrices[path] = q
        total, weights = gptq_bits(*weight.shape, settings.bits, settings.group_size)
        linears[path] = LinearMeta(tuple(weight.shape), relative_output_error(weight, dequantize(q), hessian.float()),
                                   total, weights)
    return matrices, NonExpertLayerMeta(index, linears)


def _finish(stage: StageRun, settings: NonExpertSettings) -> dict:
    stage.gather()  # under torchrun: every rank's units
    linears = [meta for name in stage.dir.unit_names()
               for meta in NonExpertLayerMeta.from_json(stage.dir.read_metadata(name)).linears.values()]
    errors = [meta.output_error for meta in linears]
    summary = {"method": settings.method, "linears": len(linears), "seconds": round(stage.seconds, 3),
               "mean_relative_output_error": round(sum(errors) / len(errors), 6) if errors else None}
    if settings.method == "none":
        return stage.finish(summary, "nonexpert: method none, the layers outside the experts stay as in the checkpoint")
    return stage.finish(summary, (
        f"nonexpert: {len(linears)} linear layers, {settings.method} at {settings.bits} bits, in {stage.seconds:.1f}s; "
        f"mean relative output error {summary['mean_relative_output_error']:.4f}"))
