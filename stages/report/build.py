"""`kbvq report`: write the figures and `report.md` of a run, from what its stages saved.

    write_report(Path("runs/mine"))                       # -> runs/mine/report/report.md
    write_report(run, out_dir, layers=[0, 3], compare_run=Path("runs/mine-vq"))

calibrate and klt-svd must be finished (a KbvqError says what to run otherwise); sections whose stage
(vq, bcos, pack) is absent are skipped with a line saying what to run to get them.
"""

from __future__ import annotations

from pathlib import Path

from kbvq_cli.atomic import atomic_write
from kbvq_cli.errors import KbvqError
from stages.report import markdown as md
from stages.report.data import RunView
from stages.report.quantized import drift_section, open_compare, storage_section
from stages.report.sections import load_section, similarity_section, spectrum_section

REPORT_FILE = "report.md"


def default_layers(moe_layers: list[int]) -> list[int]:
    """The first, middle and last MoE layer (fewer when the model has fewer)."""
    if not moe_layers:
        return []
    picked = [moe_layers[0], moe_layers[len(moe_layers) // 2], moe_layers[-1]]
    return sorted(set(picked))


def choose_layers(moe_layers: list[int], layers: list[int] | None) -> list[int]:
    """The layers to draw; every one must be a MoE layer klt-svd decomposed."""
    if not moe_layers:
        raise KbvqError("the run has no MoE layers to report on; klt-svd decomposed none")
    if layers is None:
        return default_layers(moe_layers)
    unknown = [index for index in layers if index not in moe_layers]
    if unknown or not layers:
        raise KbvqError(f"--layers {','.join(map(str, layers))}: choose MoE layers of this run "
                        f"({moe_layers[0]}-{moe_layers[-1]}: {', '.join(map(str, moe_layers[:12]))}"
                        f"{', ...' if len(moe_layers) > 12 else ''})")
    return sorted(set(layers))


def _stage_line(view: RunView, stage: str, keys: tuple[str, ...]) -> str:
    stage_dir = view.calibration.stage_dir if stage == "calibrate" else (
        view.klt.stage_dir if stage == "klt-svd" else view.stage(stage))
    if stage_dir is None:
        return f"- `{stage}`: absent ({view.missing(stage)})"
    config = stage_dir.manifest.get("config", {})
    settings = ", ".join(f"{key} {config[key]}" for key in keys if config.get(key) is not None)
    return f"- `{stage}`: finished" + (f" ({settings})" if settings else "")


def header(view: RunView, layers: list[int], compare) -> list[str]:
    lines = [f"# KBVQ-MoE report: {view.run_dir.name}", ""]
    lines += md.paragraph(f"Run `{view.run_dir}`, model `{view.source.name}` ({view.source.adapter.model_type}, "
                          f"{view.source.num_layers} layers, {view.source.num_experts} routed experts). Everything "
                          f"below is read from the stages' saved shards; nothing is recomputed from data.")
    lines += [_stage_line(view, "calibrate", ("samples", "seqlen", "routing", "min_expert_tokens", "starved_fallback")),
              _stage_line(view, "klt-svd", ("rank", "rank_ratio", "energy", "target_bits", "klt", "down")),
              _stage_line(view, "vq", ("bits", "dim", "iters")),
              _stage_line(view, "bcos", ("mode", "propagate")),
              _stage_line(view, "pack", ()), ""]
    chosen = ", ".join(map(str, layers))
    versus = f"; plain-VQ comparison: `{compare.run_dir}`" if compare else ""
    lines += md.paragraph(f"Layers drawn: {chosen}{versus}")
    return lines


def write_report(run_dir: Path, out_dir: Path | None = None, layers: list[int] | None = None,
                 compare_run: Path | None = None) -> Path:
    """Write the report's PNGs and `report.md` into `out_dir` (default RUN/report); returns report.md's path.

    layers: MoE layers to draw (default: first, middle and last); compare_run: a plain-VQ run of the same
    model whose quantized experts add a curve to the channel-drift figure.
    """
    view = RunView(Path(run_dir))
    chosen = choose_layers(view.moe_layers(), layers)
    compare = open_compare(view, compare_run) if compare_run is not None else None
    out_dir = Path(out_dir) if out_dir is not None else view.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = header(view, chosen, compare)
    lines += spectrum_section(view, out_dir, chosen)
    lines += similarity_section(view, out_dir, chosen)
    lines += drift_section(view, out_dir, chosen, compare)
    lines += storage_section(view, out_dir)
    lines += load_section(view, out_dir, chosen)
    report, text = out_dir / REPORT_FILE, "\n".join(lines).rstrip() + "\n"
    atomic_write(report, lambda temporary: Path(temporary).write_text(text))
    return report
