"""`kbvq calibrate`: stream the full-precision model layer by layer and record docs/method.md §1 statistics.

Directory `RUN/calibrate/`:
- `tokens.safetensors`: the calibration sequences (int64 [samples, seqlen]);
- `layer_NNN.safetensors`: one shard per decoder layer (see `LayerStatsCollector.tensors`);
- `activations_NNN.safetensors` while running: the input of layer NNN, committed with layer NNN-1's
  shard, so a killed run resumes at the layer where it stopped with bit-identical results.
"""

from __future__ import annotations


import torch

from kbvq_cli.activations import commit_layer, resume_activations
from kbvq_cli.console import info, progress_bar, warn
from kbvq_cli.data import data_fingerprint, load_documents, sample_sequences
from kbvq_cli.hashing import sha256_bytes
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.units import layer_unit
from kbvq_cli.streaming import LayerStreamer, pick_device
from kbvq_cli.stage_run import StageRun
from stages.calibrate.config import CalibrateSettings
from stages.calibrate.collector import LayerStatsCollector

STAGE = "calibrate"


def _calibration_tokens(source: ModelSource, settings: CalibrateSettings) -> torch.Tensor:
    documents = load_documents(settings.data, settings.text_field)
    return sample_sequences(documents, source.tokenizer(), settings.samples, settings.seqlen, settings.seed)


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings: CalibrateSettings = resolved.settings
    if resolved.model is None:
        from kbvq_cli.errors import KbvqError

        raise KbvqError("calibrate needs a model: pass --model ID_OR_DIR or a recipe with `model:`")
    source = ModelSource(resolved.model)
    device = pick_device(settings.device)
    tokens = _calibration_tokens(source, settings)
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint(), data=data_fingerprint(settings.data),
                          tokens_sha256=sha256_bytes(tokens.numpy().tobytes()), compute=torch.device(device).type)
    if stage.complete:
        return stage.skip()
    if "tokens" not in stage.dir.manifest["aux"]:
        stage.dir.commit_aux({"tokens": stage.dir.write_aux("tokens", {"input_ids": tokens})})
    torch.set_float32_matmul_precision("highest")  # TF32 off: docs/method.md §1 wants true float32 products
    return _calibrate_layers(stage, source, settings, tokens, device)


def _calibrate_layers(stage: StageRun, source: ModelSource, settings: CalibrateSettings, tokens, device) -> dict:
    stage_dir = stage.dir
    streamer = LayerStreamer(source, device)
    start, hidden = resume_activations(stage_dir, lambda: streamer.embed(tokens))
    if start:
        info(f"calibrate: resuming at layer {start} of {source.num_layers}")
    starved = dict(stage_dir.manifest["state"].get("starved", {}))
    dtype = getattr(torch, settings.moments_dtype)
    with progress_bar() as progress:
        task = progress.add_task("calibrate layers", total=source.num_layers, completed=start)
        for index in range(start, source.num_layers):
            layer = streamer.build_layer(index)
            collector = LayerStatsCollector(layer, source.adapter, source.num_experts, settings.expert_second_moments)
            try:
                hidden = _forward_layer(streamer, layer, index, hidden, settings.batch_size, device)
            finally:
                collector.close()
            starved_here = collector.starved_experts(settings.min_expert_tokens)
            if starved_here:
                starved[str(index)] = starved_here
            stats = collector.release_tensors(dtype)
            unit = (layer_unit(index), stats, collector.metadata(index).to_json())
            last = index + 1 == source.num_layers  # the last layer's output is not needed by anything
            commit_layer(stage_dir, index, unit, None if last else hidden, {"starved": starved})
            del layer, collector
            progress.advance(task)
    return _finish(stage, source, starved, start)


@torch.no_grad()
def _forward_layer(streamer, layer, index, hidden, batch_size, device) -> torch.Tensor:
    """Run `layer` over all sequences, batch by batch; hooks record statistics. Returns the outputs (CPU)."""
    output = torch.empty_like(hidden)
    for begin in range(0, hidden.shape[0], batch_size):
        batch = hidden[begin:begin + batch_size].to(device)
        result = layer(batch, **streamer.layer_kwargs(index, batch))
        result = result[0] if isinstance(result, tuple) else result
        output[begin:begin + batch_size] = result.to("cpu")
    return output


def _finish(stage: StageRun, source: ModelSource, starved: dict, start: int) -> dict:
    stage_dir, seconds = stage.dir, stage.seconds
    layers_done = source.num_layers - start
    total_bytes = sum(record["bytes"] for record in stage_dir.manifest["units"].values())
    summary = {
        "layers": source.num_layers,
        "seconds": round(seconds, 3),
        "seconds_per_layer": round(seconds / max(layers_done, 1), 3),
        "starved_experts": starved,
        "bytes": total_bytes,
    }
    if starved:
        count = sum(len(experts) for experts in starved.values())
        warn(f"calibrate: {count} expert(s) in {len(starved)} layer(s) got few tokens; their corrections stay "
             f"identity (see {stage_dir.path}/manifest.json, state.starved)")
    return stage.finish(summary, f"calibrate: {source.num_layers} layers in {seconds:.1f}s, "
                                 f"{total_bytes / 2**20:.1f} MiB of statistics in {stage_dir.path}")
