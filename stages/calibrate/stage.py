"""`kbvq calibrate`: stream the full-precision model layer by layer and record METHOD.md §1 statistics.

Directory `RUN/calibrate/`:
- `tokens.safetensors`: the calibration sequences (int64 [samples, seqlen]);
- `layer_NNN.safetensors`: one shard per decoder layer (see `LayerStatsCollector.tensors`);
- `activations_NNN.safetensors` while running: the input of layer NNN, committed with layer NNN-1's
  shard, so a killed run resumes at the layer where it stopped with bit-identical results.
"""

from __future__ import annotations

import time

import torch

from kbvq_cli.activations import commit_layer, resume_activations
from kbvq_cli.console import info, progress_bar, warn
from kbvq_cli.data import data_fingerprint, load_documents, sample_sequences
from kbvq_cli.hashing import sha256_bytes
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.stage_dir import StageDir, layer_unit
from kbvq_cli.streaming import LayerStreamer, pick_device
from kbvq_cli.stage_common import hashed_settings, open_stage
from stages.calibrate.collector import LayerStatsCollector

STAGE = "calibrate"


def _calibration_tokens(source: ModelSource, settings) -> torch.Tensor:
    documents = load_documents(settings.data, settings.text_field)
    return sample_sequences(documents, source.tokenizer(), settings.samples, settings.seqlen, settings.seed)


def run(resolved: ResolvedStage, restart: bool = False) -> dict:
    settings = resolved.settings
    if resolved.model is None:
        from kbvq_cli.errors import KbvqError

        raise KbvqError("calibrate needs a model: pass --model ID_OR_DIR or a recipe with `model:`")
    source = ModelSource(resolved.model)
    device = pick_device(settings.device)
    tokens = _calibration_tokens(source, settings)
    inputs = {
        "model": source.fingerprint(),
        "data": data_fingerprint(settings.data),
        "tokens_sha256": sha256_bytes(tokens.numpy().tobytes()),
        "compute": torch.device(device).type,
    }
    stage_dir = open_stage(resolved, STAGE, hashed_settings(settings), inputs, restart)
    if stage_dir.complete:
        info(f"calibrate: already complete in {stage_dir.path}")
        return stage_dir.manifest["summary"]
    if "tokens" not in stage_dir.manifest["aux"]:
        stage_dir.commit_aux({"tokens": stage_dir.write_aux("tokens", {"input_ids": tokens})})
    torch.set_float32_matmul_precision("highest")  # TF32 off: METHOD.md §1 wants true float32 products
    return _calibrate_layers(stage_dir, source, settings, tokens, device)


def _calibrate_layers(stage_dir, source, settings, tokens, device) -> dict:
    streamer = LayerStreamer(source, device)
    start, hidden = resume_activations(stage_dir, lambda: streamer.embed(tokens))
    if start:
        info(f"calibrate: resuming at layer {start} of {source.num_layers}")
    started, starved = time.time(), dict(stage_dir.manifest["state"].get("starved", {}))
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
            unit = (layer_unit(index), stats, {"layer": index, **collector.metadata()})
            last = index + 1 == source.num_layers  # the last layer's output is not needed by anything
            commit_layer(stage_dir, index, unit, None if last else hidden, {"starved": starved})
            del layer, collector
            progress.advance(task)
    return _finish(stage_dir, source, starved, time.time() - started, start)


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


def _finish(stage_dir: StageDir, source: ModelSource, starved: dict, seconds: float, start: int) -> dict:
    layers_done = source.num_layers - start
    total_bytes = sum(record["bytes"] for record in stage_dir.manifest["units"].values())
    summary = {
        "layers": source.num_layers,
        "seconds": round(seconds, 3),
        "seconds_per_layer": round(seconds / max(layers_done, 1), 3),
        "starved_experts": starved,
        "bytes": total_bytes,
    }
    stage_dir.finish(summary)
    if starved:
        count = sum(len(experts) for experts in starved.values())
        warn(f"calibrate: {count} expert(s) in {len(starved)} layer(s) got few tokens; their corrections stay "
             f"identity (see {stage_dir.path}/manifest.json, state.starved)")
    info(f"calibrate: {source.num_layers} layers in {seconds:.1f}s, {total_bytes / 2**20:.1f} MiB of statistics "
         f"in {stage_dir.path}")
    return summary
