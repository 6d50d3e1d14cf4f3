"""calibrate under torchrun: each rank runs its blocks of sequences, the sums are added in block order.

The collector accumulates as it always does; after each round (one block per rank) its accumulators
hold this rank's block sums, which are taken out (the accumulators zeroed), added to the running
totals in block order across ranks (`kbvq_cli.data_parallel.add_round`), and at the end put back, so
the collector releases the totals of all sequences. One process accumulates straight into the
collector in the same order (block after block from zero), so any world size writes the same bits.
"""

from __future__ import annotations

from typing import Callable

import torch

from kbvq_cli.data_parallel import Blocks, add_round
from stages.calibrate.collector import LayerStatsCollector


def accumulators(collector: LayerStatsCollector) -> dict[str, torch.Tensor]:
    """The collector's running sums by a name that is the same on every rank (views, not copies)."""
    found = {}
    sums = {f"moments.{name}": value for name, value in collector.moments.items()}
    sums.update({"gate_up": collector.gate_up, "down": collector.down} if collector.gate_up is not None else {})
    for prefix, moment in sums.items():
        found[f"{prefix}.sum_x"], found[f"{prefix}.count"] = moment.sum_x, moment.count
        if moment.sum_xxT is not None:
            found[f"{prefix}.sum_xxT"] = moment.sum_xxT
    if collector.pooled_down is not None:
        found["pooled_down"] = collector.pooled_down
    if collector.gate_up is not None:  # routed slots per expert (router.load), apart from the statistics'
        found["load"] = collector.load  # counts under `--routing all`
    return found


def record_in_rounds(collector: LayerStatsCollector, forward: Callable[[torch.Tensor], torch.Tensor],
                     hidden: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """Run this rank's blocks of `hidden` (its rows, in block order) through `forward` with the collector's
    hooks, reducing the statistics round by round; returns the outputs of this rank's blocks."""
    output = torch.empty_like(hidden)
    total = None
    for round_ in range(blocks.rounds):
        block = blocks.in_round(round_)
        if block is not None:
            begin, end = blocks.local_span(block)
            output[begin:end] = forward(hidden[begin:end])
        # Every rank ran its first block in round 0 (there are at least as many blocks as ranks), so
        # every collector has made all of its accumulators by now, with the same names and shapes.
        partial = {}
        for name, value in accumulators(collector).items():
            partial[name] = value.clone()
            value.zero_()
        total = add_round(total, partial, blocks, round_)
    for name, value in accumulators(collector).items():
        value.copy_(total[name])
    return output
