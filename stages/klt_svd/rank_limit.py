"""The largest absolute rank each decomposed part allows: min(oc, ic) of the matrices it stacks.

Past min(oc, ic) the shared basis and the coefficients together hold more numbers than the dense expert
matrix they approximate, and `select_rank` would cap the rank silently at the stack's width; so an
explicit `--rank` above the limit is refused when the stage starts, naming the limit of each part.
"""

from __future__ import annotations

from kbvq_cli.errors import KbvqError
from kbvq_cli.expert_shapes import expert_matrix_shapes
from kbvq_cli.experts import SHARED
from kbvq_cli.model_files import ModelSource


def rank_limits(shapes: dict[str, tuple[int, int]], settings) -> dict[str, int]:
    """Part name -> min(oc, ic) over the matrices klt-svd stacks for it, for the parts the settings decompose."""
    limits = {}
    for projection in ("gate", "up"):
        stacked = [shapes[projection]]
        if settings.include_shared_experts and f"{SHARED}.{projection}" in shapes:
            stacked.append(shapes[f"{SHARED}.{projection}"])
        limits[projection] = min(min(shape) for shape in stacked)
    if settings.down != "off":
        limits["down"] = min(shapes["down"])
        if f"{SHARED}.down" in shapes:
            limits[f"{SHARED}.down"] = min(shapes[f"{SHARED}.down"])
    return limits


def check_rank_fits(source: ModelSource, settings) -> None:
    """Refuse `settings.rank` above a part's limit; nothing to check for a ratio, an energy or rank 0."""
    if not settings.rank:
        return
    shapes = expert_matrix_shapes(source)
    if not shapes:
        return  # no MoE layer: klt-svd has nothing to decompose
    limits = rank_limits(shapes, settings)
    if all(settings.rank <= limit for limit in limits.values()):
        return
    listed = ", ".join(f"{part} {limit}" for part, limit in limits.items())
    raise KbvqError(f"klt-svd rank {settings.rank} is larger than min(oc, ic) of the expert matrices of "
                    f"{source.name} (the limit per projection: {listed}); pass --rank {min(limits.values())} "
                    f"or less, or a --rank-ratio")
