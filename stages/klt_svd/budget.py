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

Code sizes too (`code_sizes: ["2x2", "3x2"]`, opt-in): each (layer, projection) then also takes one of
those VQ code sizes or vq's own, for all its matrices (routed and shared expert alike). The common VQ
factor above becomes one per code size, measured, not assumed: during the spectra pass, k-means at each
candidate size of the layer's first routed expert matrix of that projection, as its relative output
error under the layer's input second moment (`kbvq_cli.code_probe`: why measured, and how it is kept
cheap). A projection's estimated error is then `factor(code) * its tail`; its cost is the §5 formula's
indices and codebooks at that size (a 3-bit d=4 codebook is 4096 x 4 x 16 bits per matrix, which the
allocator weighs against what it removes); kbvq_cli/budget.py's `allocate_coded` chooses. The chosen
size per (layer, projection) is recorded in the budget (`code_sizes`), and vq quantizes at it. The
factor is measured at rank 0 and assumed to hold at every rank; that is the estimate's assumption here.
`rank: 0` with code sizes holds every rank at 0: BCOS-only at the budget's bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from kbvq_cli.budget import (CodedChoice, CodeOption, RankChoice, allocate_coded, allocate_ranks, coded_bits,
                             coded_error, removed_error, spent_bits)
from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import PROJECTIONS, SHARED
from kbvq_cli.packed.layout import formula_groups
from kbvq_cli.packed.storage import projection_bits
from stages.klt_svd.config import parse_code_size
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

    @property
    def name(self) -> str:
        return f"{self.bits}x{self.dim}"

    def candidates(self, settings) -> list["CodeSize"]:
        """vq's own size first, then the settings' `code_sizes` (none without them)."""
        if not settings.code_sizes:
            return []
        found = [self] + [CodeSize(*parse_code_size(text), self.corrected) for text in settings.code_sizes]
        return [size for position, size in enumerate(found) if size not in found[:position]]


@dataclass(frozen=True)
class LayerCosts:
    """One MoE layer's storage: bits at rank 0, its expert weights, per part the bits of one more rank,
    the matrices whose error it carries, and its rank limit."""

    fixed_bits: int
    weights: int
    rank_cost: dict[str, int]
    matrices: dict[str, int]
    limits: dict[str, int]
    # with code sizes: projection -> code size name -> that projection's bits at rank 0 (padding included)
    code_cost: dict[str, dict[str, int]] | None = None
    projection_matrices: int = 0  # matrices per projection: the routed experts and a shared expert


def layer_costs(shapes: dict, num_experts: int, settings, code: CodeSize,
                candidates: list[CodeSize] | None = None) -> LayerCosts:
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
    code_cost = None
    if candidates:
        code_cost = {projection: {} for projection in PROJECTIONS}
        for size in candidates:
            for group in formula_groups(shapes, {}, num_experts, has_shared, stacked):
                counted = projection_bits(group.n, group.oc, group.ic, 0, size.bits, size.dim,
                                          corrected=size.corrected, with_basis=group.with_basis, side=group.side)
                found = code_cost[group.projection]
                found[size.name] = found.get(size.name, PADDING_BITS * (matrices // 3)) + counted.total
    if settings.rank == 0:  # ranks held at 0 (with code sizes): nothing to decompose
        limits = {part: 0 for part in limits}
    return LayerCosts(fixed + PADDING_BITS * matrices, weights, cost, counts, limits, code_cost, matrices // 3)


def check_code_sizes_fit(shapes: dict, candidates: list[CodeSize], model: str, recipe=None) -> None:
    """Refuse a code size whose vector length does not divide an expert matrix's input width, or that the
    run's other vq settings do not allow (e.g. codebook refinement's size limit)."""
    if recipe is not None:
        from kbvq_cli.registry import STAGES
        from kbvq_cli.settings import parse_settings

        for size in candidates:
            try:
                parse_settings(STAGES["vq"].settings_class(), {**(recipe.stages.get("vq") or {}), "bits": size.bits,
                                                               "dim": size.dim}, "vq settings")
            except KbvqError as error:
                raise KbvqError(f"klt-svd code_sizes {size.name} does not go with this run's vq settings: {error}; "
                                f"drop it from code_sizes") from None
    for size in candidates:
        narrow = sorted({ic for (_, ic) in shapes.values() if ic % size.dim})
        if narrow:
            raise KbvqError(f"klt-svd code_sizes {size.name}: vectors of {size.dim} do not tile the input width "
                            f"{narrow[0]} of {model}'s expert matrices; drop it from code_sizes")


def check_feasible(target_bits: float, costs: LayerCosts, layers: int, code: CodeSize, model: str) -> None:
    """Refuse a target below what rank 0 already costs (before anything is written)."""
    if costs.code_cost:
        cheapest = sum(min(found.values()) for found in costs.code_cost.values())
        if int(target_bits * costs.weights * layers) < cheapest * layers:
            sizes = ", ".join(sorted({name for found in costs.code_cost.values() for name in found}))
            raise KbvqError(f"klt-svd target_bits {target_bits} is below the {cheapest / costs.weights:.4f} bits "
                            f"per expert weight that {model} costs at rank 0 with the cheapest of the code sizes "
                            f"{sizes}; raise --target-bits to at least {cheapest / costs.weights:.4f}, or add a "
                            f"cheaper code size")
        return
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


def _gains(rho: list[float], matrices: int) -> tuple[float, ...]:
    steps = [rho[0]] + [later - earlier for earlier, later in zip(rho, rho[1:])] if rho else []
    gains, floor = [], float("inf")
    for step in steps:  # float rounding can make a step exceed the one before it by ~1e-16
        floor = min(floor, max(step, 0.0))
        gains.append(matrices * floor)
    return tuple(gains)


def projection_parts(projection: str, limits: dict[str, int]) -> list[str]:
    """The decomposed parts whose ranks a projection's choice holds (a shared expert's own down too)."""
    return [part for part in (projection, f"{SHARED}.{projection}") if part in limits]


def allocate_with_code_sizes(target_bits: float, costs: LayerCosts, spectra: dict[int, dict[str, list[float]]],
                             factors: dict[int, dict[str, dict[str, float]]], code: CodeSize) -> dict:
    """The allocation record of a budget with code sizes: per layer the ranks of its parts and the code size
    of each projection, from each layer's `rho` and measured factors (`factors[layer][projection][code]`)."""
    choices = []
    for layer in sorted(factors):
        for projection in PROJECTIONS:
            rho = lambda part: spectra.get(layer, {}).get(part, [])[: costs.limits[part]]  # noqa: E731
            parts = tuple(RankChoice(f"{layer}.{part}", _gains(rho(part), costs.matrices[part]), costs.rank_cost[part])
                          for part in projection_parts(projection, costs.limits))
            options = tuple(CodeOption(name, bits, factors[layer][projection][name])
                            for name, bits in costs.code_cost[projection].items())
            choices.append(CodedChoice(f"{layer}.{projection}", options, parts, float(costs.projection_matrices)))
    layers = len(factors)
    picks = allocate_coded(choices, int(target_bits * costs.weights * layers))
    ranks: dict[str, dict[str, int]] = {str(layer): {part: 0 for part in costs.limits} for layer in sorted(factors)}
    sizes: dict[str, dict[str, str]] = {str(layer): {} for layer in sorted(factors)}
    tail = after = spent = 0.0
    for choice in choices:
        pick = picks[choice.name]
        layer, projection = choice.name.split(".", 1)
        sizes[layer][projection] = pick.code
        for name, rank in pick.ranks.items():
            ranks[layer][name.split(".", 1)[1]] = rank
        spent += coded_bits(choice, pick)
        after += coded_error(choice, pick)
        tail += choice.base_error - sum(sum(p.gains[:pick.ranks[p.name]]) for p in choice.parts)
    matrices = costs.projection_matrices * 3 * layers
    return {
        "target_bits": target_bits,
        "assumes": code.to_json(),
        "ranks": ranks,
        "code_sizes": sizes,
        "code_error_factors": {str(layer): {p: {name: round(f, 6) for name, f in found.items()}
                                            for p, found in factors[layer].items()} for layer in sorted(factors)},
        "estimated_bits_per_expert_weight": round(spent / (costs.weights * layers), 6),
        "rank0_bits_per_expert_weight": round(costs.fixed_bits / costs.weights, 6),
        "estimated_shared_part_error": round(tail / matrices, 6),
        "estimated_error_after_vq": round(after / matrices, 6),
        "note": "bits by the docs/method.md §5 formula plus 7 bits of padding per index matrix, so the measured "
                "bits land at or below target_bits; the error after VQ is each projection's tail times its code "
                "size's measured factor (kbvq_cli/code_probe.py), as a mean relative output error",
    }


def probe_factors(experts, stats, candidates: list[CodeSize]) -> dict[str, dict[str, float]]:
    """projection -> code size name -> the measured VQ error factor of the layer's first routed expert."""
    from kbvq_cli.code_probe import vq_error_factor

    moments = {"gate": stats.input_moments("block").second_moment(), "down": stats.pooled_down_second_moment()}
    moments["up"] = moments["gate"]
    return {projection: {size.name: vq_error_factor(experts.routed[projection][0], moments[projection],
                                                    size.bits, size.dim) for size in candidates}
            for projection in PROJECTIONS}


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
    candidates: list[CodeSize]  # empty: ranks only

    def chooser(self, stage, moe_layers: list[int], source, calibration, device, decompose_layer):
        """`layer -> choose(part, oc, ic)` of the allocation: the one the manifest records (a resumed
        run), or a fresh one from a spectra pass over every MoE layer, committed before any layer."""
        import torch

        from kbvq_cli.experts import layer_experts

        record = stage.dir.manifest["state"].get("budget")
        if record is None:
            spectra, factors = {}, {}
            for index in moe_layers:  # every rank alike under torchrun: the same inputs, the same bits
                found: dict[str, list[float]] = {}
                experts = layer_experts(source, index, torch.float32, device)
                stats = calibration.layer(index, device)
                if self.candidates:
                    factors[index] = probe_factors(experts, stats, self.candidates)
                if self.settings.rank != 0:
                    decompose_layer(experts, stats, self.settings, capture_chooser(found))
                spectra[index] = found
            if self.candidates:
                record = allocate_with_code_sizes(self.settings.target_bits, self.costs, spectra, factors, self.code)
            else:
                record = allocate(self.settings.target_bits, self.costs, spectra, self.code)
            stage.dir.commit_aux({}, state={"budget": record})  # rank 0's commit (a no-op on the others)
        return lambda index: fixed_chooser(record["ranks"][str(index)])


def budget_plan(resolved, source, settings, moe_layers: int) -> BudgetPlan | None:
    """The plan of `--target-bits`, checked against the model's shapes before anything is written."""
    if settings.target_bits is None:
        return None
    from kbvq_cli.expert_shapes import expert_matrix_shapes

    code = CodeSize.of_recipe(resolved.recipe)
    shapes = expert_matrix_shapes(source)
    candidates = code.candidates(settings)
    check_code_sizes_fit(shapes, candidates, source.name, resolved.recipe)
    costs = layer_costs(shapes, source.num_experts, settings, code, candidates)
    check_feasible(settings.target_bits, costs, moe_layers, code, source.name)
    return BudgetPlan(settings, code, costs, candidates)
