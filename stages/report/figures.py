"""The report's figures, drawn headless: `matplotlib.figure.Figure` on the Agg canvas, never pyplot.

No global backend is switched, so the report can run inside another program that uses matplotlib.
Each function takes plain arrays and a path, and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    figure.savefig(str(path), dpi=DPI, metadata={"Software": None})
    return path


def _expert_ticks(axis, count: int) -> None:
    """Integer expert ticks on both axes of a heat map: all of them up to 16, else about 8."""
    step = 1 if count <= 16 else int(np.ceil(count / 8))
    ticks = np.arange(0, count, step)
    axis.set_xticks(ticks)
    axis.set_yticks(ticks)


def _spectrum_title(part: str, spectrum) -> str:
    space = "KLT space" if spectrum.klt else "weight space, no KLT"
    if spectrum.side == "output":
        return f"{part}: shared output space"
    return f"{part} ({'shared expert' if part.startswith('shared.') else 'stacked experts'}, {space})"


def _log_k_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_xlabel("k (log scale)")
    axis.grid(True, which="major", alpha=0.3)


def spectrum_figure(path: Path, layer: int, spectra: dict) -> Path:
    """Fig. 5: per part, normalised singular-value energy (top) and rho_k (bottom) against k, rank marked.

    spectra: part name -> `data.PartSpectrum`.
    """
    figure = _figure(3.7 * len(spectra) + 0.6, 6.4)
    axes = figure.subplots(2, len(spectra), squeeze=False)
    for column, (part, spectrum) in enumerate(spectra.items()):
        k = np.arange(1, spectrum.rho.size + 1)
        # each k's share of the total energy, from rho: exact also where klt-svd kept only the leading
        # k entries of a wide part's spectrum (rho is against the whole stack's energy)
        energy = np.diff(spectrum.rho, prepend=0.0)
        top, bottom = axes[0, column], axes[1, column]
        top.plot(k, np.where(energy > 0, energy, np.nan), color="tab:blue", linewidth=1,
                 marker="." if k.size <= 200 else None, markersize=3)
        top.set_yscale("log")
        top.set_ylabel(r"energy share $s_k^2 / \Sigma_j s_j^2$ (log)")
        top.set_title(_spectrum_title(part, spectrum), fontsize=10)
        bottom.plot(k, spectrum.rho, color="tab:green", linewidth=1.5)
        bottom.set_ylim(0, 1.02)
        bottom.set_ylabel(r"$\rho_k$ (energy captured by top k)")
        for axis in (top, bottom):
            _log_k_axis(axis)
            if spectrum.rank > 0:
                axis.axvline(spectrum.rank, color="tab:red", linestyle="--", linewidth=1)
        label = (f"chosen k = {spectrum.rank}\n" + r"$\rho_k$" + f" = {spectrum.rho_k:.3f}"
                 if spectrum.rank > 0 else "rank 0: no shared part")
        bottom.text(0.97, 0.05, label, transform=bottom.transAxes, ha="right", va="bottom", fontsize=9,
                    color="tab:red", bbox={"facecolor": "white", "edgecolor": "tab:red", "alpha": 0.85})
    figure.suptitle(f"Layer {layer}: singular-value spectrum of the expert weights (Fig. 5)")
    return _save(figure, path)


def similarity_figure(path: Path, layer: int, projection: str, before: np.ndarray, after: np.ndarray) -> Path:
    """Fig. 2: cosine similarity of experts' outputs `[E, E]` before and after removing the shared part."""
    figure = _figure(11, 5.2)
    axes = figure.subplots(1, 2)
    titles = ("before: $W_i$", r"after: $W_i - W_{share,i}$")
    for axis, matrix, title in zip(axes, (before, after), titles):
        # aspect "auto": equal-aspect images defeat the constrained layout (labels end up cut off)
        image = axis.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        off = matrix[~np.eye(matrix.shape[0], dtype=bool)]
        axis.set_title(f"{title}\nmean off-diagonal {off.mean():.3f}, mean |.| {np.abs(off).mean():.3f}",
                       fontsize=10)
        axis.set_xlabel("expert j")
        axis.set_ylabel("expert i")
        _expert_ticks(axis, matrix.shape[0])
    figure.colorbar(image, ax=axes, shrink=0.85, label="cosine similarity of outputs")
    figure.suptitle(f"Layer {layer}: similarity of routed experts' {projection}-projection outputs "
                    f"on the calibration tokens (Fig. 2)")
    return _save(figure, path)


def _line_style(label: str) -> dict:
    """FP black; the comparison run red; before BCOS orange; after BCOS blue, dashed (it lies on FP)."""
    colour = "black" if label == "FP" else ("tab:blue" if label.endswith("+ BCOS") else
                                           "tab:orange" if label.endswith("before BCOS") else "tab:red")
    return {"color": colour, "linewidth": 1.6 if label == "FP" else 1.0,
            "linestyle": "--" if label.endswith("+ BCOS") else "-", "alpha": 0.9, "label": label}


def drift_figure(path: Path, layer: int, curves: dict) -> Path:
    """Fig. 3: per-channel mean and variance of each variant (left) and their deviation from FP (right).

    curves: label -> `core.ChannelStats`, with "FP" among them.
    """
    figure = _figure(14, 7.2)
    axes = figure.subplots(2, 2, sharex=True)
    reference = curves["FP"]
    for label, stats in curves.items():
        channels = np.arange(stats.mean.numel())
        axes[0, 0].plot(channels, stats.mean.numpy(), **_line_style(label))
        axes[1, 0].plot(channels, stats.variance.numpy(), **_line_style(label))
        if label != "FP":
            ratio = stats.variance / reference.variance.clamp_min(1e-300)
            axes[0, 1].plot(channels, (stats.mean - reference.mean).numpy(), **_line_style(label))
            axes[1, 1].plot(channels, ratio.numpy(), **_line_style(label))
    axes[0, 1].axhline(0, color="gray", linewidth=1, zorder=0)
    axes[1, 1].axhline(1, color="gray", linewidth=1, zorder=0)
    axes[0, 0].set_ylabel("per-channel mean")
    positive = reference.variance[reference.variance > 0]
    wide = positive.numel() > 0 and float(positive.max() / positive.min()) > 20
    axes[1, 0].set_yscale("log" if wide else "linear")
    axes[1, 0].set_ylabel("per-channel variance" + (" (log scale)" if wide else ""))
    axes[0, 1].set_ylabel("mean - FP mean")
    axes[1, 1].set_ylabel("variance / FP variance")
    for axis in axes.flat:
        axis.grid(True, alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("output channel of the down projection (hidden dimension)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    figure.suptitle(f"Layer {layer}: routed experts' down-projection outputs, pooled over experts (Fig. 3)")
    return _save(figure, path)


def storage_figure(path: Path, labels: list[str], part_bytes: list[int], bits: dict[str, float]) -> Path:
    """Table 8: bytes of each part (left, MB) and effective bits per weight (right), both axes from zero.

    bits: bar label -> bits per weight; a label naming the "original" is drawn black, "nominal" grey.
    """
    figure = _figure(12, 4.4)
    left, right = figure.subplots(1, 2, width_ratios=(1.25, 1))
    total = max(sum(part_bytes), 1)
    megabytes = np.array(part_bytes, dtype=np.float64) / 1e6
    rows = np.arange(len(labels))
    left.barh(rows, megabytes, color="tab:blue")
    left.set_yticks(rows, labels)
    left.invert_yaxis()
    left.set_xlabel("MB (10^6 bytes)")
    left.set_xlim(0, megabytes.max() * 1.35 if megabytes.max() > 0 else 1)
    for row, (value, raw) in enumerate(zip(megabytes, part_bytes)):
        left.text(value, row, f" {raw:,} B ({100 * raw / total:.1f}%)", va="center", fontsize=8)
    left.set_title("bytes of the compressed model, by part", fontsize=10)
    bit_labels, bit_values = list(bits), list(bits.values())
    rows = np.arange(len(bit_labels))
    colours = ["black" if "original" in label else "tab:gray" if label.startswith("nominal") else "tab:green"
               for label in bit_labels]
    right.barh(rows, bit_values, color=colours)
    right.set_yticks(rows, bit_labels)
    right.invert_yaxis()
    right.set_xlabel("bits per weight")
    right.set_xlim(0, max(bit_values) * 1.2)
    for row, value in enumerate(bit_values):
        right.text(value, row, f" {value:.3f}", va="center", fontsize=8)
    right.set_title("effective bits per weight", fontsize=10)
    figure.suptitle("Storage (Table 8, docs/method.md §5)")
    return _save(figure, path)


def load_figure(path: Path, layers: list[int], loads: np.ndarray, min_tokens: int) -> Path:
    """Tokens routed to each expert `loads [layers, E]` as a heat map; starved experts boxed in red."""
    count = loads.shape[1]
    figure = _figure(min(max(8.0, 2.5 + 0.5 * count), 16), min(max(3.2, 2.0 + 0.5 * len(layers)), 12))
    axis = figure.subplots()
    image = axis.imshow(loads, cmap="viridis", vmin=0, vmax=max(int(loads.max()), 1), aspect="auto",
                        interpolation="nearest")
    from matplotlib.patches import Rectangle

    for row, column in zip(*np.nonzero(loads < min_tokens)):
        axis.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red",
                                 linewidth=2 if count <= 32 else 1.2))
    if loads.size <= 400:
        threshold = loads.max() * 0.6
        for (row, column), value in np.ndenumerate(loads):
            axis.text(column, row, str(int(value)), ha="center", va="center", fontsize=7,
                      color="black" if value > threshold else "white")
    rows = np.arange(0, len(layers), 1 if len(layers) <= 24 else int(np.ceil(len(layers) / 24)))
    axis.set_yticks(rows, [f"layer {layers[row]}" for row in rows])
    step = 1 if count <= 32 else int(np.ceil(count / 16))
    axis.set_xticks(np.arange(0, count, step))
    axis.set_xlabel("expert")
    figure.colorbar(image, ax=axis, label="tokens routed (top-k assignments)")
    starved = int((loads < min_tokens).sum())
    axis.set_title(f"Expert load on the calibration tokens\nred box: starved (< {min_tokens} tokens), "
                   f"{starved} of {loads.size} (expert, layer) pairs", fontsize=10)
    return _save(figure, path)
