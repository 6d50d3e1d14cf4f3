"""`kbvq calibrate`: stream the full-precision model layer by layer and record docs/method.md §1 statistics.

Directory `RUN/calibrate/`:
- `tokens.safetensors`: the calibration sequences (int64 [samples, seqlen]);
- `layer_NNN.safetensors`: one shard per decoder layer (see `LayerStatsCollector.tensors`);
- `activations_NNN.safetensors` while running: the input of layer NNN, committed with layer NNN-1's
  shard, so a killed run resumes at the layer where it stopped with bit-identical results.

Rerunning `kbvq calibrate` repairs a calibration: its resume hashes every file, and a corrupt or
missing layer shard, tokens file or activations checkpoint is redone (from the embeddings of the
stored tokens when no checkpoint before it survives), giving the bytes of an uninterrupted run.
"""

from __future__ import annotations


import torch

from kbvq_cli.activations import commit_layer, plan_layers
from kbvq_cli.data_parallel import Blocks
from kbvq_cli.console import progress_bar, warn
from kbvq_cli.data import data_fingerprint, load_documents, sample_sequences
from kbvq_cli.hashing import sha256_bytes
from kbvq_cli.model_files import ModelSource
from kbvq_cli.recipe import ResolvedStage
from kbvq_cli.units import layer_unit
from kbvq_cli.streaming import LayerStreamer, pick_device
from kbvq_cli.stage_run import StageRun
from stages.calibrate.config import CalibrateSettings
from stages.calibrate.collector import LayerStatsCollector
from stages.calibrate.fallback import collect_fallback
from stages.calibrate.parallel import record_in_rounds

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
    Blocks.here(tokens.shape[0], settings.batch_size)  # under torchrun, enough blocks for every rank: before any write
    stage = StageRun.open(resolved, STAGE, restart, model=source.fingerprint(), data=data_fingerprint(settings.data),
                          tokens_sha256=sha256_bytes(tokens.numpy().tobytes()), compute=torch.device(device).type)
    if stage.complete:
        return stage.skip()
    if "tokens" not in stage.dir.manifest["aux"]:
        stage.dir.commit_aux({"tokens": stage.dir.write_aux("tokens", {"input_ids": tokens})})
    torch.set_float32_matmul_precision("highest")  # TF32 off: docs/method.md §1 wants true float32 products
    return _calibrate_layers(stage, source, settings, tokens, device)


def _calibrate_layers(stage: StageRun, source: ModelSource, settings: CalibrateSettings, tokens, device) -> dict:
    """Record every layer whose shard is missing: a fresh run's all, a killed run's rest, or those a
    resume found corrupt. Present layers before a missing one are run forward only (`plan_layers`)."""
    stage_dir = stage.dir
    streamer = LayerStreamer(source, device)
    todo = [index for index in range(source.num_layers) if not stage_dir.has_unit(layer_unit(index))]
    blocks = Blocks.here(tokens.shape[0], settings.batch_size)  # under torchrun, this rank's sequences
    plan = plan_layers(stage_dir, todo, lambda: streamer.embed(blocks.select(tokens)), blocks)
    starved = dict(stage_dir.manifest["state"].get("starved", {}))
    starved_tokens = dict(stage_dir.manifest["state"].get("starved_tokens", {}))  # layer -> {expert: tokens}
    for layer, experts in starved.items():  # a calibration begun before the counts were recorded
        starved_tokens.setdefault(layer, {str(e): None for e in experts})
    if plan is None:  # every shard is there (e.g. killed between the last shard and the final commit)
        return _finish(stage, source, settings, starved_tokens, 0)
    hidden = plan.hidden
    with progress_bar() as progress:
        task = progress.add_task("calibrate layers", total=plan.stop - plan.start)
        for index in range(plan.start, plan.stop):
            layer = streamer.build_layer(index)
            unit = None
            if index in plan.todo:
                hidden, unit, starved_here = _record_layer(streamer, layer, index, hidden, source, settings, device,
                                                           blocks)
                starved.pop(str(index), None)
                starved_tokens.pop(str(index), None)
                if starved_here:
                    starved[str(index)] = sorted(starved_here)
                    starved_tokens[str(index)] = {str(e): n for e, n in sorted(starved_here.items())}
            else:
                hidden = _forward_layer(streamer, layer, index, hidden, settings.batch_size, device)
            state = {"starved": starved, "starved_tokens": starved_tokens}
            commit_layer(stage_dir, index, unit, None if plan.is_last(index) else hidden, state, blocks)
            del layer
            progress.advance(task)
    return _finish(stage, source, settings, starved_tokens, len(todo))


def _record_layer(streamer, layer, index: int, hidden, source: ModelSource, settings: CalibrateSettings, device,
                  blocks: Blocks):
    """Run one layer with the statistics hooks: (its output, its unit, its starved experts). Under
    torchrun each rank runs its blocks and the sums are added in block order (`record_in_rounds`)."""
    collector = LayerStatsCollector(layer, source.adapter, source.num_experts, settings.expert_second_moments,
                                    routing=settings.routing, layout=settings.moments)
    inputs = hidden
    try:
        hidden = _stats_pass(streamer, layer, index, inputs, settings, device, blocks, collector)
    finally:
        collector.close()
    # expert -> its routed tokens (router.load: the same as its count under the model's routing)
    starved_here = {e: int(collector.load[e]) for e in collector.starved_experts(settings.min_expert_tokens)}
    if starved_here and settings.starved_fallback == "all-tokens":  # (under `routing: all` none starves)
        collector.fallback = collect_fallback(
            layer, source.adapter, sorted(starved_here), settings.expert_second_moments, collector.expert_dtype,
            lambda fallback: _stats_pass(streamer, layer, index, inputs, settings, device, blocks, fallback))
    stats = collector.release_tensors(getattr(torch, settings.moments_dtype))
    return hidden, (layer_unit(index), stats, collector.metadata(index).to_json()), starved_here


def _stats_pass(streamer, layer, index: int, hidden, settings: CalibrateSettings, device, blocks: Blocks, collector):
    """The layer over this rank's sequences with `collector`'s hooks on: its output. Under torchrun the
    sums are added in block order across ranks (`record_in_rounds`), so any world size gives the same bits."""
    if blocks.ranks == 1:
        return _forward_layer(streamer, layer, index, hidden, settings.batch_size, device)
    forward = lambda batch: _forward_layer(streamer, layer, index, batch, settings.batch_size, device)  # noqa: E731
    return record_in_rounds(collector, forward, hidden, blocks)


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


def _finish(stage: StageRun, source: ModelSource, settings: CalibrateSettings, starved: dict, layers_done: int
            ) -> dict:
    """`starved`: layer -> {expert: routed tokens} of the experts under min_expert_tokens."""
    stage_dir, seconds = stage.dir, stage.seconds
    total_bytes = sum(record["bytes"] for record in stage_dir.manifest["units"].values())
    summary = {
        "layers": source.num_layers,
        "seconds": round(seconds, 3),
        "seconds_per_layer": round(seconds / max(layers_done, 1), 3),
        "starved_experts": {layer: sorted(int(e) for e in experts) for layer, experts in starved.items()},
        "starved_tokens": starved,
        "starved_fallback": settings.starved_fallback,
        "bytes": total_bytes,
    }
    if starved:
        count = sum(len(experts) for experts in starved.values())
        what = ("their statistics are those of every token of their layer (starved_fallback all-tokens)"
                if settings.starved_fallback == "all-tokens" else "their corrections stay identity")
        warn(f"calibrate: {count} expert(s) in {len(starved)} layer(s) got fewer than {settings.min_expert_tokens} "
             f"routed tokens; {what} (see {stage_dir.path}/manifest.json, state.starved_tokens)")
    return stage.finish(summary, f"calibrate: {source.num_layers} layers in {seconds:.1f}s, "
                                 f"{total_bytes / 2**20:.1f} MiB of statistics in {stage_dir.path}")
