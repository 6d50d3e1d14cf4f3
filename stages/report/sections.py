"""Report sections 1, 2 and 5: spectrum (Fig. 5), expert similarity (Fig. 2) and expert load.

Each section takes the opened run, the output directory and the chosen layers, writes its PNGs and
returns its markdown lines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.report import markdown as md
from stages.report.core import off_diagonal, output_similarity
from stages.report.data import RunView, layer_spectra
from stages.report.figures import load_figure, similarity_figure, spectrum_figure

SIMILARITY_PROJECTION = "gate"
PART_ORDER = ("gate", "up", "down", "shared.down")


def _ordered(parts) -> list[str]:
    return [p for p in PART_ORDER if p in parts] + sorted(p for p in parts if p not in PART_ORDER)


def spectrum_table(view: RunView) -> list[str]:
    """Rank and rho_k of every part of every MoE layer, as klt-svd recorded them."""
    metadata = {i: view.klt.layer_meta(i).parts for i in view.moe_layers()}
    names = _ordered({part for parts in metadata.values() for part in parts})
    headers = ["layer"] + [f"{name} {column}" for name in names for column in ("k", "rho_k")]
    rows = []
    for index, parts in metadata.items():
        row = [str(index)]
        for name in names:
            info = parts.get(name)
            row += [md.fmt_int(info.rank), md.fmt_ratio(info.rho_k)] if info else ["-", "-"]
        rows.append(row)
    return md.table(headers, rows)


def spectrum_section(view: RunView, out_dir: Path, layers: list[int]) -> list[str]:
    lines = md.heading("1. Spectrum of the stacked experts (Fig. 5)")
    lines += md.paragraph(
        "Per MoE layer and part: the chosen rank k and rho_k, the share of the stacked experts' energy (sum of "
        "squared singular values, in KLT space where the KLT was used) that the shared basis captures (Eq. 17). "
        "`shared.down` is a shared expert's own down projection, decomposed alone.")
    lines += spectrum_table(view) + _budget_paragraph(view)
    for index in layers:
        spectra = layer_spectra(view, index)
        spectra = {name: spectra[name] for name in _ordered(spectra)}
        path = spectrum_figure(out_dir / f"spectrum_layer_{index:03d}.png", index, spectra)
        lines += md.image(path, f"Layer {index}: energy share of each singular value (top, log-log) and rho_k "
                                f"(bottom) against k; the red dashed line is the rank klt-svd chose.")
    return lines


def _budget_paragraph(view: RunView) -> list[str]:
    """How `--target-bits` chose the ranks above (klt-svd's manifest `budget`), if it did."""
    budget = view.klt.stage_dir.manifest.get("summary", {}).get("budget")
    if not budget:
        return []
    code = budget["assumes"]
    return md.paragraph(
        f"The ranks above were chosen by `--target-bits {budget['target_bits']}` (stages/klt_svd/budget.py): greedily "
        f"by estimated output error removed per bit, each rank's estimate its share of the stacked energy. At "
        f"{code['bits']}-bit codes of length {code['dim']}{' with BCOS' if code['corrected'] else ''} the parts cost "
        f"{budget['rank0_bits_per_expert_weight']:.4f} bits per expert weight at rank 0 and "
        f"{budget['estimated_bits_per_expert_weight']:.4f} with these ranks"
        f"{' and the code sizes below' if budget.get('code_sizes') else ''} (formula, padding reserved); the shared "
        f"parts leave a mean relative tail energy of {budget['estimated_shared_part_error']:.4f}."
    ) + _code_sizes_table(budget)


def _code_sizes_table(budget: dict) -> list[str]:
    """The code size a budget with `code_sizes` chose per layer and projection, with the measured factors."""
    if not budget.get("code_sizes"):
        return []
    lines = md.paragraph(
        f"Code sizes were chosen too (bits x vector length, per layer and projection, for its routed and shared "
        f"matrices alike), by the estimated error after VQ: each projection's tail times its code size's measured "
        f"factor (in brackets: the relative output error k-means at that size leaves of the layer's first expert, "
        f"kbvq_cli/code_probe.py). Estimated mean relative output error after VQ: "
        f"{budget['estimated_error_after_vq']:.4f}.")
    rows = []
    for layer, sizes in budget["code_sizes"].items():
        factors = budget["code_error_factors"][layer]
        cell = lambda p: f"**{sizes[p]}** (" + ", ".join(f"{n} {f:.3f}" for n, f in factors[p].items()) + ")"  # noqa: E731
        rows.append([layer] + [cell(p) for p in ("gate", "up", "down")])
    return lines + md.table(["layer", "gate", "up", "down"], rows)


def layer_similarity(view: RunView, index: int, projection: str) -> tuple[np.ndarray, np.ndarray]:
    """Output cosine similarity `[E, E]` of the routed experts' `projection`, before and after removing
    `W_share`, over the layer's block input (all calibration tokens)."""
    experts = view.experts(index)
    second_moment = view.calibration.layer(index).input_moments("block").second_moment()
    parts = view.klt.layer(index)
    weights = experts.routed[projection]
    residuals = torch.stack([parts.residual(projection, e, weights[e]) for e in range(experts.num_experts)])
    return (output_similarity(weights, second_moment).numpy(), output_similarity(residuals, second_moment).numpy())


def similarity_section(view: RunView, out_dir: Path, layers: list[int]) -> list[str]:
    projection = SIMILARITY_PROJECTION
    lines = md.heading("2. Expert similarity before and after removing the shared part (Fig. 2)")
    lines += md.paragraph(
        f"Cosine similarity of two routed experts' `{projection}`-projection outputs over all calibration tokens "
        f"of the layer, Tr(W_i C W_j^T) / sqrt(Tr(W_i C W_i^T) Tr(W_j C W_j^T)) with C the uncentred second moment "
        f"of the MoE block input (from calibrate; no data pass). 'After' uses W_i - W_share,i, what vq quantizes. "
        f"Output channels are compared index by index, so high similarity shows only where the experts' "
        f"intermediate neurons correspond (e.g. experts upcycled from one dense MLP); experts trained from "
        f"scratch have permuted neurons and read near 0 here whatever their redundancy.")
    rows = []
    for index in layers:
        before, after = layer_similarity(view, index, projection)
        path = similarity_figure(out_dir / f"similarity_layer_{index:03d}.png", index, projection, before, after)
        lines += md.image(path, f"Layer {index}: output similarity of the routed experts' {projection} "
                                f"projections, before (left) and after (right) removing the shared part.")
        off_before, off_after = off_diagonal(torch.from_numpy(before)), off_diagonal(torch.from_numpy(after))
        rows.append([str(index)] + [md.fmt_ratio(float(v)) for v in (
            off_before.mean(), off_after.mean(), off_before.abs().mean(), off_after.abs().mean())])
    headers = ["layer", "mean cos before", "mean cos after", "mean abs cos before", "mean abs cos after"]
    return lines + md.paragraph("Off-diagonal means:") + md.table(headers, rows)


def load_section(view: RunView, out_dir: Path, layers: list[int]) -> list[str]:
    moe = view.moe_layers()
    loads = np.stack([view.router_load(index) for index in moe])
    minimum = view.min_expert_tokens
    lines = md.heading("5. Expert load on the calibration tokens")
    lines += md.paragraph(f"Tokens routed to each expert (top-k assignments, from calibrate). An expert with fewer "
                          f"than calibrate's min_expert_tokens = {minimum} is starved.{_fallback(view)}"
                          f"{_bcos_starved(view)}")
    path = load_figure(out_dir / "expert_load.png", moe, loads, minimum)
    lines += md.image(path, "Tokens per expert (columns) and MoE layer (rows); starved experts boxed in red.")
    rows = [[str(index), md.fmt_int(load.sum()), md.fmt_int(load.min()), md.fmt_int(load.max()),
             ", ".join(str(e) for e in np.nonzero(load < minimum)[0]) or "none"] for index, load in zip(moe, loads)]
    lines += md.table(["layer", "assignments", "min", "max", "starved experts"], rows)
    chosen = [moe.index(index) for index in layers]
    per_expert = [[str(e)] + [_load_cell(loads[row, e], minimum) for row in chosen] for e in range(loads.shape[1])]
    lines += md.paragraph("Per expert, in the chosen layers (starved in bold):")
    lines += md.table(["expert"] + [f"layer {index}" for index in layers], per_expert)
    _write_load_csv(out_dir / "expert_load.csv", moe, loads, minimum)
    return lines + md.paragraph("Every layer's counts: [expert_load.csv](expert_load.csv).")


def _fallback(view: RunView) -> str:
    """What calibrate did with its starved experts (`starved_fallback`), and which they were."""
    manifest = view.calibration.stage_dir.manifest
    starved = manifest.get("state", {}).get("starved_tokens", {})
    listed = "; ".join(f"layer {layer}: " + ", ".join(f"expert {e} ({n} tokens)" for e, n in experts.items())
                       for layer, experts in starved.items())
    if manifest["config"].get("starved_fallback", "all-tokens") == "none":
        return f" Their statistics are their few routed tokens' (starved_fallback none): {listed or 'none'}."
    return (f" Their statistics were taken over every token of their layer instead (starved_fallback "
            f"all-tokens): {listed or 'none'}.")


def _bcos_starved(view: RunView) -> str:
    """What bcos did with its own starved experts (its min_tokens may differ from calibrate's threshold)."""
    bcos = view.stage("bcos")
    if bcos is None:
        return ""
    starved = bcos.manifest.get("summary", {}).get("starved_experts", {})
    listed = "; ".join(f"layer {layer}: {', '.join(map(str, experts))}" for layer, experts in starved.items())
    return (f" bcos kept the identity correction for experts under its min_tokens = "
            f"{bcos.manifest['config'].get('min_tokens')}: {listed or 'none'}.")


def _load_cell(value, minimum: int) -> str:
    return f"**{md.fmt_int(value)}**" if value < minimum else md.fmt_int(value)


def _write_load_csv(path: Path, layers: list[int], loads: np.ndarray, minimum: int) -> None:
    rows = ["layer,expert,tokens,starved"]
    rows += [f"{index},{e},{int(loads[row, e])},{int(loads[row, e] < minimum)}"
             for row, index in enumerate(layers) for e in range(loads.shape[1])]
    path.write_text("\n".join(rows) + "\n")
