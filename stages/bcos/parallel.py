"""`bcos --propagate` data parallel: the quantized stream's moments summed per block of sequences, the
blocks added in block order, so any world size (one process included) gives the same corrections.

The blocks are calibrate's (`kbvq_cli.data_parallel.Blocks` of its batch size): each rank streams its
own blocks of sequences through the quantized layers and captures their block inputs, concatenated in
block order, `per_sequence` tokens per sequence. An expert's input moments are the sums over its
tokens within each block, added from zero in block order (`add_round`: per round every rank sums the
block it holds). Every per-block product is computed on that block's rows alone, so the matrix shapes,
and with them the bits, do not depend on how many blocks a rank holds.
"""

from __future__ import annotations

from typing import Callable

import torch

from kbvq_cli.data_parallel import Blocks, add_round
from kbvq_cli.moments import InputMoments, input_moments
from stages.calibrate.reader import Calibration


def propagation_blocks(calibration: Calibration) -> Blocks:
    """This rank's blocks of the calibration sequences, calibrate's partition (refused, writing nothing,
    when there are fewer blocks than processes)."""
    return Blocks.here(int(calibration.tokens().shape[0]), calibration.block_size)


def block_rows(tokens: torch.Tensor | None, blocks: Blocks, per_sequence: int) -> Callable[[int], torch.Tensor]:
    """`rows(block)`: the indices, into this rank's captured tokens, of `tokens` (ascending int64 indices
    into them; None: all tokens, a shared expert) that lie in `block`."""

    def rows(block: int) -> torch.Tensor:
        begin, end = (bound * per_sequence for bound in blocks.local_span(block))
        if tokens is None:
            return torch.arange(begin, end)
        return tokens[(tokens >= begin) & (tokens < end)]

    return rows


def ordered_moments(inputs: Callable[[int], torch.Tensor], width: int, blocks: Blocks, device) -> InputMoments:
    """Mean and covariance of the inputs `inputs(block) [t, width]` of every block, over all ranks: sums
    within a block (`sum_x` float64, `x^T x` in float32 then float64, like calibrate), blocks in order."""
    total = None
    for round_ in range(blocks.rounds):
        block = blocks.in_round(round_)
        if block is None:  # this rank has no block this round: zeros keep the collective's shapes
            x = torch.zeros(0, width, device=device)
        else:
            x = inputs(block).float()
        partial = {"sum_x": x.sum(0, dtype=torch.float64), "sum_xxT": (x.T @ x).double(),
                   "count": torch.tensor(x.shape[0], dtype=torch.int64, device=x.device)}
        total = add_round(total, partial, blocks, round_)
    return input_moments(total["sum_x"], total["sum_xxT"], int(total["count"]))
