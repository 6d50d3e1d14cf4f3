"""`kbvq bcos --propagate`: corrections from the inputs the quantized model itself produces.

The calibration tokens are pushed layer by layer through the *quantized and corrected* model (every
earlier layer's experts replaced by `What` with their BCOS corrections). At each MoE layer:
1. the block input and routing are captured from that quantized stream;
2. gate and up are corrected from those inputs' per-expert moments (against the full-precision
   moments from `calibrate`);
3. the down input is recomputed through the corrected gate and up, and down is corrected from it;
4. the corrected layer is installed and the stream advances.
So each correction also removes the drift accumulated upstream (the paper's motivation, Fig. 3).
Activations are committed with each layer, so a killed run resumes where it stopped.

Under torchrun each rank streams its own blocks of sequences and the moments are summed in block order
across ranks (`stages.bcos.parallel`), so every rank computes the same corrections, bit-identical to one
process; rank 0 commits them with every rank's activations.
"""

from __future__ import annotations

import torch

from kbvq_cli.activations import commit_layer, plan_layers
from kbvq_cli.console import progress_bar
from kbvq_cli.corrected_experts import CorrectedExperts, corrected_linear, fold
from kbvq_cli.data_parallel import Blocks
from kbvq_cli.experts import PROJECTIONS, SHARED, LayerExperts, layer_experts, routed_tokens
from kbvq_cli.moments import InputMoments
from kbvq_cli.streaming import LayerStreamer, module_at
from kbvq_cli.units import layer_unit
from stages.bcos.core import bcos_correction
from stages.bcos.parallel import block_rows, ordered_moments
from stages.bcos.reader import STORE_DTYPE, BcosLayerMeta, BcosLayerUnit, Correction


def _correct(experts, quantized, stats, projection, expert, q_moments: InputMoments, settings):
    return bcos_correction(experts.matrix(projection, expert), quantized[(projection, expert)],
                           stats.expert_input_moments(expert, projection, experts.shared_path), q_moments,
                           mode=settings.mode, min_tokens=settings.min_tokens, min_std_ratio=settings.min_std_ratio)


def _apply(weight, correction, x):
    scale, shift = correction.scale.to(STORE_DTYPE).float(), correction.shift.to(STORE_DTYPE).float()
    return (1 + scale) * (x @ weight.T) + shift


def layer_corrections(experts: LayerExperts, quantized: dict, stats, x: torch.Tensor, routing: torch.Tensor,
                      act_fns: dict, settings, blocks: Blocks) -> tuple[BcosLayerUnit, list[str]]:
    """Corrections of one MoE layer from its quantized-stream block input `x [T, H]` and routing `[T, k]`
    (this rank's `blocks` of sequences, in block order; the moments are summed over every rank's)."""
    tokens_of = routed_tokens(routing, experts.num_experts)
    per_sequence = x.shape[0] // max(sum(end - begin for begin, end in map(blocks.span, blocks.mine())), 1)
    per_projection = {p: {} for p in PROJECTIONS}
    starved = []
    for expert in experts.expert_ids():
        rows = block_rows(None if expert == SHARED else tokens_of[expert], blocks, per_sequence)
        xe = lambda block: x[rows(block)]  # noqa: E731  (this expert's tokens of one block)
        x_moments = ordered_moments(xe, x.shape[1], blocks, x.device)
        gate = _correct(experts, quantized, stats, "gate", expert, x_moments, settings)
        up = _correct(experts, quantized, stats, "up", expert, x_moments, settings)
        act = act_fns[SHARED if expert == SHARED else "routed"]

        def h(block):  # the down input through the corrected gate and up (called at once: no late binding)
            return act(_apply(quantized[("gate", expert)], gate, xe(block))) * _apply(quantized[("up", expert)], up,
                                                                                       xe(block))

        h_moments = ordered_moments(h, quantized[("down", expert)].shape[1], blocks, x.device)
        down = _correct(experts, quantized, stats, "down", expert, h_moments, settings)
        for projection, correction in (("gate", gate), ("up", up), ("down", down)):
            per_projection[projection][expert] = correction
        if gate.starved:
            starved.append(str(expert))
    routed, shared = {}, {}
    for projection, corrections in per_projection.items():
        found = [corrections[e] for e in range(experts.num_experts)]
        routed[projection] = Correction(torch.stack([c.scale for c in found]), torch.stack([c.shift for c in found]))
        if SHARED in corrections:
            shared[projection] = Correction(corrections[SHARED].scale, corrections[SHARED].shift)
    return BcosLayerUnit(routed, shared), starved


def install_corrections(layer, adapter, experts: LayerExperts, quantized: dict, unit: BcosLayerUnit) -> None:
    """Replace the layer's experts by the quantized, corrected ones (as the packed model computes them)."""
    tensors = unit.to_tensors()  # the stored 16-bit values, as the packed model will hold them

    def stored(name):
        return tensors[name].float().to(quantized[("gate", 0)].device)

    routed = range(experts.num_experts)
    gate_up = torch.stack([torch.cat([fold(quantized[("gate", e)], stored("gate.scale")[e]),
                                      fold(quantized[("up", e)], stored("up.scale")[e])]) for e in routed])
    down = torch.stack([fold(quantized[("down", e)], stored("down.scale")[e]) for e in routed])
    gate_up_bias = torch.cat([stored("gate.shift"), stored("up.shift")], dim=1)
    original = module_at(layer, adapter.experts)
    parent_path, _, name = adapter.experts.rpartition(".")
    setattr(module_at(layer, parent_path), name,
            CorrectedExperts(gate_up, gate_up_bias, down, stored("down.shift"), original.act_fn))
    if experts.shared:
        shared = module_at(layer, experts.shared_path)
        for projection in PROJECTIONS:
            setattr(shared, f"{projection}_proj", corrected_linear(
                quantized[(projection, SHARED)], stored(f"{SHARED}.{projection}.scale"),
                stored(f"{SHARED}.{projection}.shift")))


@torch.no_grad()
def capture_block_inputs(streamer: LayerStreamer, layer, index: int, hidden, batch_size: int, device):
    """Run `layer` over the stream; return the MoE block inputs [T, H] and routing [T, k] its experts saw."""
    captured = []

    def hook(module, args):
        captured.append((args[0].reshape(-1, args[0].shape[-1]).float(), args[1]))

    handle = module_at(layer, streamer.adapter.experts).register_forward_pre_hook(hook)
    try:
        run_stream(streamer, layer, index, hidden, batch_size, device)
    finally:
        handle.remove()
    return torch.cat([x for x, _ in captured]), torch.cat([r for _, r in captured])


@torch.no_grad()
def run_stream(streamer: LayerStreamer, layer, index: int, hidden, batch_size: int, device) -> torch.Tensor:
    output = torch.empty_like(hidden)
    for begin in range(0, hidden.shape[0], batch_size):
        batch = hidden[begin:begin + batch_size].to(device)
        result = layer(batch, **streamer.layer_kwargs(index, batch))
        output[begin:begin + batch_size] = (result[0] if isinstance(result, tuple) else result).cpu()
    return output


def run_propagated(stage_dir, source, calibration, klt, codes, settings, device, blocks: Blocks) -> None:
    """The layer loop of `--propagate`, resumable: activations are committed with each layer. A layer whose
    unit is already there (before one a resume must redo) is run with its recorded corrections installed,
    so the stream it passes on is the one an uninterrupted run saw. `blocks`: this rank's sequences."""
    streamer = LayerStreamer(source, device)
    moe_layers = set(klt.layers())
    todo = [index for index in sorted(moe_layers) if not stage_dir.has_unit(layer_unit(index))]
    plan = plan_layers(stage_dir, todo, lambda: streamer.embed(blocks.select(calibration.tokens())), blocks)
    if plan is None:
        return
    hidden, batch_size = plan.hidden, 1
    with progress_bar() as progress:
        task = progress.add_task("bcos --propagate layers", total=plan.stop - plan.start)
        for index in range(plan.start, plan.stop):
            layer = streamer.build_layer(index)
            unit = None
            if index in moe_layers:
                experts = layer_experts(source, index, torch.float32, device)
                quantized = codes.quantized_layer(experts, klt, index, device)
                if index in plan.todo:
                    corrections, unit = _correct_layer(streamer, layer, index, hidden, experts, quantized,
                                                       calibration, settings, device, blocks)
                else:
                    corrections = BcosLayerUnit.from_tensors(stage_dir.read_unit(layer_unit(index), device))
                install_corrections(layer, source.adapter, experts, quantized, corrections)
            last = plan.is_last(index)
            hidden = hidden if last else run_stream(streamer, layer, index, hidden, batch_size, device)
            commit_layer(stage_dir, index, unit, None if last else hidden, {}, blocks)
            progress.advance(task)


def _correct_layer(streamer, layer, index, hidden, experts, quantized, calibration, settings, device, blocks):
    """One MoE layer's corrections from the quantized stream: (corrections, the unit to commit)."""
    x, routing = capture_block_inputs(streamer, layer, index, hidden, 1, device)
    act_fns = {"routed": module_at(layer, streamer.adapter.experts).act_fn}
    if experts.shared:
        act_fns[SHARED] = module_at(layer, experts.shared_path).act_fn
    corrections, starved = layer_corrections(experts, quantized, calibration.layer(index, device), x, routing,
                                             act_fns, settings, blocks)
    unit = (layer_unit(index), corrections.to_tensors(), BcosLayerMeta(index, starved, 0, None, None).to_json())
    return corrections, unit
