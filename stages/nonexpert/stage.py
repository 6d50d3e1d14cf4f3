"""`kbvq nonexpert`: RTN/GPTQ of the linear layers outside the experts (attention by default).

One unit per decoder layer, `RUN/nonexpert/layer_NNN.safetensors`, holding for each quantized linear at
module path `P` (inside the layer): `P.codes` uint8 [oc, ic], `P.scale`, `P.zero` float16 [oc, G] (and
`P.group_index` with act_order); GPTQ's Hessian is that linear's input second moment from calibrate.
With `method: none` (the default) the stage finishes at once with no units: nothing is quantized.
"""

from __future__ import annotations

import time


from kbvq_cli.console import info, progress_bar
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_common import hashed_settings, open_stage, require_model, upstream_inputs
from kbvq_cli.stage_dir import layer_unit
from stages.calibrate.reader import Calibration
from stages.gptq.core import dequantize, gptq_bits, quantize_scalar
from stages.gptq.stage import stored_tensors
from stages.vq.stage import relative_output_error

STAGE = "nonexpert"


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
    settings = resolved.settings
    calibration = Calibration(resolved.run_dir)
    source = ModelSource(require_model(resolved))
    inputs = {"upstream": upstream_inputs({"calibrate": calibration.stage_dir}), "model": source.fingerprint()}
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"nonexpert: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    started = time.time()
    if settings.method != "none":
        with progress_bar() as progress:
            task = progress.add_task("nonexpert layers", total=source.num_layers)
            for index in range(source.num_layers):
                if not stage_dir.has_unit(layer_unit(index)):
                    tensors, metadata = quantize_layer(source, calibration, index, settings)
                    stage_dir.write_unit(layer_unit(index), tensors, {"layer": index, "linears": metadata})
                progress.advance(task)
    return _finish(stage_dir, settings, time.time() - started)


def quantize_layer(source: ModelSource, calibration: Calibration, index: int, settings) -> tuple[dict, dict]:
    state, stats = source.layer_state_dict(index), calibration.layer(index)
    tensors, metadata = {}, {}
    for path in chosen_linears(source, state, settings.modules):
        weight = state[f"{path}.weight"].float()
        hessian = stats.input_moments(f"linear.{path}").second_moment()
        q = quantize_scalar(weight, hessian, settings.method, settings.bits, settings.group_size, settings.damp,
                            settings.act_order)
        tensors.update(stored_tensors(q, path))
        total, weights = gptq_bits(*weight.shape, settings.bits, settings.group_size)
        metadata[path] = {"shape": list(weight.shape), "output_error": relative_output_error(weight, dequantize(q),
                                                                                             hessian.float()),
                          "storage_bits": total, "weights": weights}
    return tensors, metadata


def _finish(stage_dir, settings, seconds: float) -> dict:
    linears = [meta for name in stage_dir.unit_names() for meta in stage_dir.read_metadata(name)["linears"].values()]
    errors = [meta["output_error"] for meta in linears]
    summary = {"method": settings.method, "linears": len(linears), "seconds": round(seconds, 3),
               "mean_relative_output_error": round(sum(errors) / len(errors), 6) if errors else None}
    stage_dir.finish(summary)
    if settings.method == "none":
        info("nonexpert: method none, the layers outside the experts stay as in the checkpoint")
    else:
        info(f"nonexpert: {len(linears)} linear layers, {settings.method} at {settings.bits} bits, in {seconds:.1f}s; "
             f"mean relative output error {summary['mean_relative_output_error']:.4f}")
    return summary
