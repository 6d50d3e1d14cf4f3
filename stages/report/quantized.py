"""Report sections 3 and 4, which need the vq codes: channel drift (Fig. 3) and storage (Table 8)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.experts import LayerExperts
from kbvq_cli.moments import InputMoments, input_moments
from stages.bcos.reader import BcosCorrections
from stages.calibrate.reader import CalibrationLayer
from stages.klt_svd.reader import KltSvd
from stages.report import markdown as md
from stages.report.core import ChannelStats, drift, pooled_channel_stats
from stages.report.data import RunView
from stages.report.figures import drift_figure, storage_figure
from stages.report.storage import Storage, part_label, run_storage
from stages.vq.reader import VqCodes


@dataclass(frozen=True)
class CompareRun:
    """A second run of the same model (plain VQ: klt-svd --rank 0, vq, bcos --mode none) for Fig. 3."""

    run_dir: Path
    klt: KltSvd
    codes: VqCodes
    label: str


def open_compare(view: RunView, run_dir: Path) -> CompareRun:
    """Open `--compare RUN`: its klt-svd and vq must be finished and made from the same model files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KbvqError(f"--compare run {run_dir} does not exist; make a plain-VQ run first (klt-svd --rank 0, vq)")
    klt, codes = KltSvd(run_dir), VqCodes(run_dir)
    if klt.stage_dir.manifest["inputs"].get("model") != view.klt.stage_dir.manifest["inputs"].get("model"):
        raise KbvqError(f"--compare run {run_dir} was made from other model files than {view.run_dir}; "
                        f"compare two runs of the same model")
    label = "plain VQ" if _ranks(klt) <= {0} else f"compare: {run_dir.name}"
    return CompareRun(run_dir, klt, codes, label)


def down_input_moments(stats: CalibrationLayer) -> list[InputMoments] | None:
    """Each routed expert's down-input mean and covariance over its routed tokens; None if calibrate kept
    no per-expert second moments."""
    if not stats.has_expert_second_moments:
        return None
    moments = [stats.expert_input("down", e, None) for e in range(len(stats.expert_counts("down")))]
    return [input_moments(m.sum_x, m.sum_xxT, m.count) for m in moments]


def quantized_down(klt: KltSvd, codes: VqCodes, index: int, experts: LayerExperts) -> list[torch.Tensor]:
    """`W_share + VQ(W_spec)` `[H, I]` of every routed expert's down projection, float32."""
    parts, shape = klt.layer(index), tuple(experts.routed["down"].shape[1:])
    return [codes.expert(index, e).matrix("down", parts, e, shape) for e in range(experts.num_experts)]


def _ranks(klt: KltSvd) -> set[int]:
    return {part.rank for index in klt.layers() for part in klt.layer_meta(index).parts.values()}


def _bcos_applies(view: RunView) -> bool:
    bcos = view.stage("bcos")
    return bcos is not None and bcos.manifest["config"].get("mode") != "none"


def layer_drift_curves(view: RunView, index: int, compare: CompareRun | None) -> dict[str, ChannelStats] | None:
    """Label -> pooled channel statistics of the routed experts' down outputs (None: no per-expert moments)."""
    moments = down_input_moments(view.calibration.layer(index))
    if moments is None:
        return None
    experts = view.experts(index)
    curves = {"FP": pooled_channel_stats(list(experts.routed["down"]), moments)}
    if compare is not None:
        plain = quantized_down(compare.klt, compare.codes, index, experts)
        curves[compare.label] = pooled_channel_stats(plain, moments)
    method = "KBVQ" if _ranks(view.klt) - {0} else "VQ (rank 0)"
    quantized = quantized_down(view.klt, VqCodes(view.run_dir), index, experts)
    curves[f"{method} before BCOS"] = pooled_channel_stats(quantized, moments)
    if _bcos_applies(view):
        down = BcosCorrections(view.run_dir).layer(index).routed["down"]
        corrections = [(down.scale[e], down.shift[e]) for e in range(experts.num_experts)]
        curves[f"{method} + BCOS"] = pooled_channel_stats(quantized, moments, corrections)
    return curves


def _drift_rows(index: int, curves: dict[str, ChannelStats]) -> list[list[str]]:
    reference = curves["FP"]
    rows = []
    for label, stats in curves.items():
        if label != "FP":
            found = drift(stats, reference)
            rows.append([str(index), label, md.fmt_ratio(found.mean_abs_mean_shift),
                         md.fmt_ratio(found.relative_mean_shift), md.fmt_ratio(found.mean_abs_log_variance_ratio)])
    return rows


def _bcos_note(view: RunView) -> list[str]:
    """What the BCOS curve can show, given how bcos ran."""
    bcos = view.stage("bcos")
    if bcos is None:
        return md.skipped(f"{view.missing('bcos')} (for the KBVQ + BCOS curve)")
    config = bcos.manifest["config"]
    if config.get("mode") == "none":
        return md.paragraph("bcos ran with mode none (identity): there is no corrected curve to draw.")
    if config.get("propagate"):
        return md.paragraph("bcos ran with --propagate: its corrections were fitted to the quantized model's own "
                            "inputs, so on these full-precision inputs they need not match FP exactly.")
    if config.get("mode") == "full":
        return md.paragraph("On these inputs BCOS (mode full) matches each expert's channel mean and variance by "
                            "construction, up to float16 rounding and experts it left uncorrected (starved, flat).")
    return md.paragraph(f"bcos ran with mode {config.get('mode')}: it matches only the "
                        f"{'mean' if config.get('mode') == 'mean' else 'spread'} of each channel.")


def drift_section(view: RunView, out_dir: Path, layers: list[int], compare: CompareRun | None) -> list[str]:
    lines = md.heading("3. Channel drift of the layer output (Fig. 3)")
    if view.stage("vq") is None:
        return lines + md.skipped(f"{view.missing('vq')} (the drift needs the quantized experts)")
    lines += md.paragraph(
        "Per output channel of the routed experts' down projections (the hidden channels the layer adds to the "
        "residual stream), mean and variance pooled over (expert, routed token) pairs, before the routing weights. "
        "Closed form from calibrate's per-expert moments: every variant reads the full-precision input of the "
        "down projection, so errors of earlier layers and of gate/up are not propagated.")
    lines += _bcos_note(view)
    if compare is None:
        lines += md.paragraph("No plain-VQ curve: pass `--compare RUN_VQ`, a run of the same model with "
                              "`klt-svd --rank 0`, `vq` and `bcos --mode none`.")
    rows = []
    for index in layers:
        curves = layer_drift_curves(view, index, compare)
        if curves is None:
            return lines + md.skipped("calibrate kept no per-expert second moments; rerun `kbvq calibrate "
                                      f"--run {view.run_dir} --restart` with expert_second_moments: true")
        path = drift_figure(out_dir / f"drift_layer_{index:03d}.png", index, curves)
        lines += md.image(path, f"Layer {index}: per-channel mean (top) and variance (bottom) of "
                                f"{', '.join(curves)} (left), and their deviation from FP (right).")
        rows += _drift_rows(index, curves)
    headers = ["layer", "variant", "mean abs mean shift", "shift / mean FP std", "mean abs ln(var / var FP)"]
    return lines + md.paragraph("Distance from FP, averaged over channels:") + md.table(headers, rows)


def _storage_rows(storage: Storage) -> list[list[str]]:
    """One row per part, then the quantized expert parts together and the whole model."""
    total, rows = max(storage.total_bytes, 1), []
    for part, size in storage.parts.items():
        per_expert = "-" if part == "unquantized" else md.fmt_bits(8 * size / storage.expert_weights)
        rows.append([part_label(part, storage.origin), md.fmt_int(size), per_expert,
                     md.fmt_bits(8 * size / storage.model_weights), f"{100 * size / total:.2f}%"])
    quantized = storage.total_bytes - storage.parts["unquantized"]
    rows.append(["**expert weights (all parts above but unquantized)**", md.fmt_int(quantized),
                 md.fmt_bits(storage.bits_per_expert_weight), md.fmt_bits(8 * quantized / storage.model_weights),
                 f"{100 * quantized / total:.2f}%"])
    rows.append(["**whole model**", md.fmt_int(storage.total_bytes), "-", md.fmt_bits(storage.bits_per_weight),
                 "100.00%"])
    return rows


def _storage_bits(view: RunView, storage: Storage) -> dict[str, float]:
    bits = {}
    if view.stage("vq") is not None:
        bits[f"nominal b = {view.vq_setting('bits')} (index bits)"] = float(view.vq_setting("bits"))
    bits["expert weights, measured"] = storage.bits_per_expert_weight
    if storage.bits_per_routed_expert_weight is not None:
        bits["routed experts, measured"] = storage.bits_per_routed_expert_weight
    bits["§5 formula" + (", routed experts" if storage.origin == "shards" else "")] = (
        storage.formula_bits_per_expert_weight)
    bits["whole model, measured"] = storage.bits_per_weight
    original = "16-bit original" if storage.origin == "shards" else "original model files"
    bits[original] = 8 * storage.original_bytes / storage.model_weights
    return bits


def _storage_notes(view: RunView, storage: Storage) -> list[str]:
    if storage.origin == "pack":
        kept = view.stage("pack").manifest.get("config", {}).get("unquantized_dtype")
        kept = f" Unquantized layers are kept as `{kept}` (pack's unquantized_dtype)." if kept else ""
        return md.paragraph(f"From `kbvq pack`'s summary; the packed files take {md.fmt_int(storage.bytes_on_disk)} "
                            f"bytes on disk.{kept}")
    bits, dim = view.vq_setting("bits"), view.vq_setting("dim")
    why = ("pack recorded no storage summary" if view.stage("pack") is not None else
           f"no `pack` stage yet: run `kbvq pack --run {view.run_dir}` for the packed files")
    lines = md.paragraph(
        f"Counted from the shapes in the klt-svd, vq and bcos shards ({why}): indices at b·d = {bits * dim} bits "
        f"per {dim} weights; everything else, and every model parameter no vq unit quantizes, at 16 bits.")
    if view.stage("bcos") is None:
        lines += md.skipped(f"{view.missing('bcos')} (BCOS scale/shift are counted as 0 bytes until then)")
    elif not _bcos_applies(view):
        lines += md.paragraph("bcos ran with mode none: the identity correction takes no storage (0 bytes).")
    return lines


def _storage_summary(storage: Storage) -> list[str]:
    """The bullet lines under the storage table: weights, bits measured and by formula, whole model."""
    routed = ("" if storage.bits_per_routed_expert_weight is None else
              f"; routed experts alone: {md.fmt_bits(storage.bits_per_routed_expert_weight)}")
    formula = ("over the routed experts (n experts of oc x ic, rank k, b bits, d, per layer and projection; a part "
               "shared on its output side counts 16k(oc + n ic) for its shared term)" if storage.origin == "shards"
               else "as pack counts it, per group of matrices sharing a basis")
    original = "at 16 bits" if storage.origin == "shards" else "for the original model files"
    return [f"- quantized expert weights: {md.fmt_int(storage.expert_weights)}; model parameters: "
            f"{md.fmt_int(storage.model_weights)}",
            f"- bits per expert weight: {md.fmt_bits(storage.bits_per_expert_weight)} measured (all quantized "
            f"expert matrices){routed}",
            f"- docs/method.md §5 formula: {md.fmt_bits(storage.formula_bits_per_expert_weight)}, {formula}",
            f"- whole model: {md.fmt_bits(storage.bits_per_weight)} bits per weight, {md.fmt_int(storage.total_bytes)} "
            f"bytes against {md.fmt_int(storage.original_bytes)} {original} "
            f"({storage.original_bytes / max(storage.total_bytes, 1):.2f}x smaller)", ""]


def storage_section(view: RunView, out_dir: Path) -> list[str]:
    lines = md.heading("4. Storage and effective bits (Table 8)")
    storage = run_storage(view)
    if storage is None:
        return lines + md.skipped(f"{view.missing('vq')} (storage needs the vq codes)")
    lines += _storage_notes(view, storage)
    lines += md.table(["part", "bytes", "bits per expert weight", "bits per model weight", "share"],
                      _storage_rows(storage))
    lines += _storage_summary(storage)
    labels = [part_label(part, storage.origin) for part in storage.parts]
    path = storage_figure(out_dir / "storage.png", labels, list(storage.parts.values()),
                          _storage_bits(view, storage))
    return lines + md.image(path, "Bytes of each part of the compressed model (left) and bits per weight (right).")
