"""The math of calibration statistics: running sums of x and x x^T, and routed-token bookkeeping.

Products of a batch are taken in float32 (TF32 off, set by the stage) and accumulated in float64, as
docs/method.md §1 asks: float64 matmuls run at 1/32 rate on consumer GPUs, float64 sums cost nothing.
"""

from __future__ import annotations

import torch


class MomentSums:
    """Running `sum_x [*lead, D]` (float64), `sum_xxT [*lead, D, D]` (`dtype`, float64 by default) and
    `count [*lead]` (int64).

    `lead` is () for one input space or (E,) for one per expert.
    """

    def __init__(self, dim: int, device, lead: tuple[int, ...] = (), second_moment: bool = True,
                 dtype: torch.dtype = torch.float64):
        self.sum_x = torch.zeros(*lead, dim, dtype=torch.float64, device=device)
        self.sum_xxT = torch.zeros(*lead, dim, dim, dtype=dtype, device=device) if second_moment else None
        self.count = torch.zeros(lead, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor, slot: int | None = None) -> None:
        """Add the rows of `x [T, D]` (float32) to the sums, to slot `slot` when there is a lead dim."""
        index = () if slot is None else (slot,)
        self.sum_x[index] += x.sum(dim=0, dtype=torch.float64)
        if self.sum_xxT is not None:
            self.sum_xxT[index] += (x.T @ x).to(self.sum_xxT.dtype)
        self.count[index] += x.shape[0]

    def pooled_second_moment(self) -> torch.Tensor:
        """`sum_xxT` summed over the lead (expert) dim in float64 [D, D], one slice at a time."""
        total = torch.zeros(self.sum_xxT.shape[-2:], dtype=torch.float64, device=self.sum_xxT.device)
        for block in self.sum_xxT.reshape(-1, *self.sum_xxT.shape[-2:]):
            total += block
        return total

    def release(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The sums as CPU tensors in `dtype` (counts int64), freeing the accumulators: the exact layout.

        Second moments are converted one expert slice at a time, so converting a [E, D, D] float64
        accumulator costs half its size in extra memory rather than one and a half.
        """
        out = {f"{prefix}.sum_x": self.sum_x.to(dtype).cpu(), f"{prefix}.count": self.count.reshape(-1).cpu()}
        if self.sum_xxT is not None:
            converted = torch.empty(self.sum_xxT.shape, dtype=dtype, device="cpu")
            slices = self.sum_xxT.reshape(-1, *self.sum_xxT.shape[-2:])  # [E or 1, D, D], a view
            for index, block in enumerate(slices):
                converted.view(-1, *converted.shape[-2:])[index] = block.to(dtype).cpu()
            self.sum_xxT = None
            out[f"{prefix}.sum_xxT"] = converted
        return out


def expert_intermediate(x: torch.Tensor, gate_up: torch.Tensor, act_fn) -> torch.Tensor:
    """The `down` input of one expert: act(gate x) * (up x). x [T, H], gate_up [2I, H] -> [T, I]."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return act_fn(gate) * up
