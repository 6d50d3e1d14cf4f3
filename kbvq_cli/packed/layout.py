"""Names and groupings of the packed format, shared by `pack`, the loader and the storage report.

A packed model directory is `RUN/pack/` (or `--out DIR`): `config.json` with a `quantization_config`,
the tokenizer files, `manifest.json`, and one safetensors shard per decoder layer (`layer_NNN`) plus
`model_rest` (embeddings, final norm, lm_head). Unquantized tensors keep their in-memory transformers
names (fused `mlp.experts.*` layout). For a quantized routed projection `P` of layer `i`, under
`model.layers.i.mlp.experts.P.`:
    indices        uint8 [E, ceil(oc * ic / d * b * d / 8)]   bit-packed, `b*d` bits each (kbvq_cli.packed.bitpack)
    codebook       16-bit [E, 2^(b d), d]
    scale, shift   16-bit [E, oc]                              BCOS (absent when bcos mode is none)
    shared_basis   16-bit [k, ic] (input side) or [k, oc] (output side)
    expert_coeffs  16-bit [E, oc, k] (input side) or [E, k, ic] (output side)
A shared expert's projection (`model.layers.i.mlp.shared_expert.P_proj.`) holds the same without the
expert dimension; its gate/up `expert_coeffs` [oc, k] use the routed `shared_basis` (they were stacked
with the routed experts), its down has its own `shared_basis`.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "kbvq"
FORMAT_VERSION = 1
REST_UNIT = "model_rest"
# A non-expert linear quantized by `kbvq nonexpert` (RTN/GPTQ) replaces `P.weight` by these tensors,
# named apart from the experts' parts: scalar part -> suffix under the linear's module path `P`.
NONEXPERT_PARTS = {"codes": "weight_codes", "qscale": "weight_scale", "qzero": "weight_zero",
                   "group_index": "weight_group_index"}


def routed_prefix(layers_prefix: str, experts_path: str, layer: int, projection: str) -> str:
    return f"{layers_prefix}.{layer}.{experts_path}.{projection}."


def shared_prefix(layers_prefix: str, shared_path: str, layer: int, projection: str) -> str:
    return f"{layers_prefix}.{layer}.{shared_path}.{projection}_proj."


@dataclass(frozen=True)
class FormulaGroup:
    """Matrices whose storage docs/method.md §5 counts together: `n` experts of `oc x ic` sharing rank `k`."""

    n: int
    oc: int
    ic: int
    rank: int
    with_basis: bool = True  # False: coefficients against another group's shared basis
    side: str = "input"  # which side of the matrices the basis is shared on (klt-svd's part metadata)
    projection: str = ""  # gate, up or down: whose code size the group's matrices take


def formula_groups(shapes: dict, parts: dict, num_experts: int, has_shared: bool,
                   shared_stacked: dict[str, bool]) -> list[FormulaGroup]:
    """The groups of one MoE layer. shapes: projection -> (oc, ic) of routed experts, and
    "shared.<projection>" -> (oc, ic) of the shared expert; parts: klt-svd's part metadata."""
    rank = lambda name: int(parts[name]["rank"]) if name in parts else 0  # noqa: E731
    side = lambda name: parts.get(name, {}).get("side", "input")  # noqa: E731
    groups = []
    for projection in ("gate", "up", "down"):
        oc, ic = shapes[projection]
        groups.append(FormulaGroup(num_experts, oc, ic, rank(projection), side=side(projection), projection=projection))
        if has_shared:
            # A stacked shared expert (gate/up) shares the routed basis: docs/method.md §5 with n = E + 1
            # when its size equals the routed experts'; otherwise it adds only its own coefficients.
            soc, sic = shapes[f"shared.{projection}"]
            if shared_stacked.get(projection, False):
                groups.append(FormulaGroup(1, soc, sic, rank(projection), with_basis=False, side=side(projection),
                                           projection=projection))
            else:
                name = f"shared.{projection}"
                groups.append(FormulaGroup(1, soc, sic, rank(name), side=side(name), projection=projection))
    return groups
