"""`klt-svd --target-bits B`: the IDRE rank of every layer and projection, chosen for a total of at most B
bits per expert weight (docs/method.md §5 storage; kbvq_cli/budget.py allocates).

How the error is estimated, and why. With the KLT, the output error of leaving a part to VQ is
proportional to what the shared part leaves: the tail `sum_{j>k} sigma_j^2` of the stacked mapped
experts, exactly for the shared part alone (§2). VQ at a fixed code size then removes about the same
fraction of any residual's energy, so the error after VQ is that tail times a factor common to every
part, and rank j of a part removes about `sigma_j^2 / sum sigma^2` (its energy share, the step of klt-svd's
`rho`) of each of the part's matrices' relative output error. The allocation maximises the removed
error summed over expert matrices (a stacked part counts once per matrix it holds), so the objective
is the mean relative output error the stages report, in their own units. The common VQ factor is
assumed, not measured: it is why this is an estimate.

The code size the budget assumes (vq's bits and vector length, and whether BCOS stores its scale and
shift) comes from the run's recipe, is hashed into klt-svd's inputs and recorded in its manifest; `vq`
and `bcos` refuse settings that differ from it (`stages.klt_svd.reader.check_budget_code_size`).
Choosing the code bits per projection too is not done: vq takes one code size for all of a run's matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbvq_cli.budget import RankChoice, allocate_ranks, removed_error, spent_bits
from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import SHARED
from kbvq_cli.packed.layout import formula_groups
from kbvq_cli.packed.storage import projection_bits
from stages.klt_svd.rank_limit import rank_limits

PADDING_BITS = 7  # at most this much bit-packing padding per stored index matrix (kbvq_cli/packed/bitpack.py)


@dataclass(frozen=True)
class CodeSize:
    """What the budget assumes of the later stages: vq's bits and vector length, BCOS on or off."""

    bits: int
    dim: int
    corrected: bool

    @classmethod
    def of_recipe(cls, recipe) -> "CodeSize":
        from kbvq_cli.registry import STAGES
        from kbvq_cli.settings import parse_settings

        vq = parse_settings(STAGES["vq"].settings_class(), recipe.stages.get("vq"), "vq settings")
        bcos = parse_settings(STAGES["bcos"].settings_class(), recipe.stages.get("bcos"), "bcos settings")
        return cls(vq.bits, vq.dim, bcos.mode != "none")

    def to_json(self) -> dict:
        return {"bits": self.bits, "dim": self.dim, "corrected": self.corrected}


@dataclass(frozen=True)
class LayerCosts:
    """One MoE layer's storage: bits at rank 0, its expert weights, per part the bits of one more rank,
    the matrices whose error it carries, and its rank limit."""

    fixed_bits: int
    weights: int
    rank_cost: dict[str, int]
    matrices: dict[str, int]
    limits: dict[str, int]


def layer_costs(shapes: dict, num_experts: int, settings, code: CodeSize) -> LayerCosts:
    has_shared = f"{SHARED}.gate" in shapes
    stacked = {p: has_shared and settings.include_shared_experts for p in ("gate", "up")}
    limits = rank_limits(shapes, settings)
    side = {part: "output" if part == "down" and settings.down == "output" else "input" for part in limits}

    def total(parts: dict) -> tuple[int, int]:
        bits = weights = 0
        for group in formula_groups(shapes, parts, num_experts, has_shared, stacked):
            counted = projection_bits(group.n, group.oc, group.ic, group.rank, code.bits, code.dim,
                                      corrected=code.corrected, with_basis=group.with_basis, side=group.side)
            bits, weights = bits + counted.total, weights + counted.weights
        return bits, weights

    fixed, weights = total({})
    matrices = 3 * num_experts + (3 if has_shared else 0)
    cost = {part: total({part: {"rank": 1, "side": side[part]}})[0] - fixed for part in limits}
    counts = {part: (1 if part.startswith(f"{SHARED}.") else num_experts + int(stacked.get(part, False)))
              for part in limits}
    return LayerCosts(fixed + PADDING_BITS * matrices, weights, cost, counts, limits)


def check_feasible(target_bits: float, costs: LayerCosts, layers: int, code: CodeSize, model: str) -> None:
    """Refuse a target below what rank 0 already costs (before anything is written)."""
    floor = costs.fixed_bits / costs.weights
    if target_bits * costs.weights * layers < costs.fixed_bits * layers:
        raise KbvqError(f"klt-svd target_bits {target_bits} is below the {floor:.4f} bits per expert weight that "
                        f"{model} costs with no shared part ({code.bits}-bit codes of length {code.dim}: indices, "
                        f"codebooks{', BCOS scale and shift' if code.corrected else ''}); raise --target-bits to at "
                        f"least {floor:.4f}, or lower vq's bits")


def allocate(target_bits: float, costs: LayerCosts, spectra: dict[int, dict[str, list[float]]], code: CodeSize
             ) -> dict:
    """The allocation record (the manifest's `budget`) from each layer's per-part `rho` (cumulative shares)."""
    choices = []
    for layer in sorted(spectra):
        for part in costs.limits:
            rho = spectra[layer][part][: costs.limits[part]]
            steps = [rho[0]] + [later - earlier for earlier, later in zip(rho, rho[1:])] if rho else []
            gains, floor = [], float("inf")
            for step in steps:  # float rounding can make a step exceed the one before it by ~1e-16
                floor = min(floor, max(step, 0.0))
                gains.append(costs.matrices[part] * floor)
            choices.append(RankChoice(f"{layer}.{part}", tuple(gains), costs.rank_cost[part]))
    layers = len(spectra)
    budget = int(target_bits * costs.weights * layers) - costs.fixed_bits * layers
    ranks = allocate_ranks(choices, budget)
    matrices = sum(costs.matrices.values()) * layers
    total_error = float(matrices)  # the relative error of every matrix at rank 0 is 1 of its own energy
    spent = spent_bits(choices, ranks)
    by_layer: dict[str, dict[str, int]] = {}
    for name, rank in ranks.items():
        layer, part = name.split(".", 1)
        by_layer.setdefault(layer, {})[part] = rank
    return {
        "target_bits": target_bits,
        "assumes": code.to_json(),
        "ranks": by_layer,
        "estimated_bits_per_expert_weight": round((costs.fixed_bits * layers + spent) / (costs.weights * layers), 6),
        "rank0_bits_per_expert_weight": round(costs.fixed_bits / costs.weights, 6),
        "estimated_shared_part_error": round((total_error - removed_error(choices, ranks)) / matrices, 6),
        "note": "bits by the docs/method.md §5 formula plus 7 bits of padding per index matrix, so the measured "
                "bits land at or below target_bits; the error is the mean relative tail energy the shared "
                "parts leave (what VQ then quantizes)",
    }


def capture_chooser(found: dict[str, list[float]]):
    """A rank chooser for `decompose_layer` that records each part's rho and asks for rank 0 (the spectra
    pass: the eigendecompositions only)."""
    def choose(part: str, oc: int, ic: int):
        def pick(rho) -> int:
            found[part] = [float(value) for value in rho.double().cpu()]
            return 0
        return pick
    return choose


def fixed_chooser(ranks: dict[str, int]):
    """A rank chooser for `decompose_layer` that gives each part its allocated rank."""
    return lambda part, oc, ic: (lambda rho: ranks[part])


@dataclass(frozen=True)
class BudgetPlan:
    settings: object  # KltSvdSettings
    code: CodeSize
    costs: LayerCosts

    def chooser(self, stage, moe_layers: list[int], source, calibration, device, decompose_layer):
        """`layer -> choose(part, oc, ic)` of the allocation: the one the manifest records (a resumed
        run), or a fresh one from a spectra pass over every MoE layer, committed before any layer."""
        import torch

        from kbvq_cli.experts import layer_experts

        record = stage.dir.manifest["state"].get("budget")
        if record is None:
            spectra = {}
            for index in moe_layers:  # every rank alike under torchrun: the same inputs, the same bits
                found: dict[str, list[float]] = {}
                experts = layer_experts(source, index, torch.float32, device)
                decompose_layer(experts, calibration.layer(index, device), self.settings, capture_chooser(found))
                spectra[index] = found
            record = allocate(self.settings.target_bits, self.costs, spectra, self.code)
            stage.dir.commit_aux({}, state={"budget": record})  # rank 0's commit (a no-op on the others)
        return lambda index: fixed_chooser(record["ranks"][str(index)])


def budget_plan(resolved, source, settings, moe_layers: int) -> BudgetPlan | None:
    """The plan of `--target-bits`, checked against the model's shapes before anything is written."""
    if settings.target_bits is None:
        return None
    from kbvq_cli.expert_shapes import expert_matrix_shapes

    code = CodeSize.of_recipe(resolved.recipe)
    costs = layer_costs(expert_matrix_shapes(source), source.num_experts, settings, code)
    check_feasible(settings.target_bits, costs, moe_layers, code, source.name)
    return BudgetPlan(settings, code, costs)
