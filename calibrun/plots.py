"""Every figure calibrun draws, written as PNG files (matplotlib, Agg): reliability
diagrams, confidence histograms, and metrics against a swept value (``calibrun-report``).

The diagrams draw the bin table of ``calibrun.metrics.bin_stats`` (columns ``bin, lo, hi,
count, conf, acc``) and print the ECE/MCE they are given; the curves draw the numbers they
are given. No metric formula lives here, so a figure can never disagree with the tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

# Runs write figures on headless machines and in worker processes: never open a window.
matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.patches  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import Container  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from calibrun._io import atomic_open  # noqa: E402

BIN_COLUMNS = ("lo", "hi", "count", "conf", "acc")
ACC_COLOUR = "#1f4e9c"
GAP_COLOUR = "#d62728"
UNDER_COLOUR = "#ff7f0e"
# What a legend takes: an artist, or a container of them (the error bars).
Handle = Artist | Container
CURVE_COLOUR = "#2ca02c"
# Bins with fewer samples than this are faded and labelled with their count.
SPARSE = 10
DPI = 150
# Marker and dash of the i-th curve of a panel (cycled): curves that coincide stay visible.
CURVE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CURVE_DASHES = ("-", "--", "-.", ":")


def _save(fig: Figure, path: Path | str) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically and close it."""
    try:
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)


def reliability_diagram(bins: pd.DataFrame, path: Path | str | None, title: str = "", ece: float | None = None,
                        mce: float | None = None, ax: Axes | None = None, sparse: int = SPARSE,
                        legend: bool = True, curve: pd.DataFrame | None = None) -> list[Handle]:
    """Reliability diagram: accuracy per confidence bin against perfect calibration.

    Blue bars are the accuracy of each non-empty bin over its [lo, hi] width. The gap to
    the bin's mean confidence is a red band above the bar where the model is
    overconfident and an orange hatched outline inside the bar where it is
    underconfident, so the two never blend. Bins with fewer than ``sparse`` samples are
    faded and labelled with their count; with ``acc_lo``/``acc_hi`` columns each bar has
    its accuracy's interval as an error bar. ``curve`` (``calibrun.bootstrap.smooth_curve``)
    adds the smooth reliability curve with its band where the confidences lie.
    ``ece``/``mce`` are printed as given, under the title. With ``ax`` the diagram is drawn
    there and nothing is saved; the legend goes below the axes unless ``legend=False``.
    Returns the legend handles.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", Figure 1.
    """
    missing = [c for c in BIN_COLUMNS if c not in bins.columns]
    if missing:
        raise ValueError(f"bins lacks columns {missing}; expected the table of metrics.bin_stats")
    if ax is None and path is None:
        raise ValueError("reliability_diagram needs a path to save to, or an ax to draw into")
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 5.2))
    handles = _draw_bins(ax, bins[bins["count"] > 0], sparse)
    if curve is not None:
        handles += _draw_curve(ax, curve)
    scores = " · ".join(f"{name} = {value:.4f}" for name, value in (("ECE", ece), ("MCE", mce)) if value is not None)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence", ylabel="Accuracy",
           title="\n".join(part for part in (title, scores) if part))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=2, frameon=False)
    if fig is not None:
        fig.tight_layout()
        assert path is not None  # refused above: without an ax there must be a path
        _save(fig, path)
    return handles


def _draw_bins(ax: Axes, filled: pd.DataFrame, sparse: int) -> list[Handle]:
    """The bars of a reliability diagram (an empty bin has nothing to show) and the
    diagonal; returns the legend handles."""
    lo = filled["lo"].to_numpy(dtype=float)
    width = filled["hi"].to_numpy(dtype=float) - lo
    acc, conf = filled["acc"].to_numpy(dtype=float), filled["conf"].to_numpy(dtype=float)
    count = filled["count"].to_numpy(dtype=int)
    acc_bars = ax.bar(lo, acc, width=width, align="edge", color=ACC_COLOUR, edgecolor="black", linewidth=0.5,
                      label="Accuracy", zorder=2)
    error_bars = None
    if {"acc_lo", "acc_hi"} <= set(filled.columns):
        below = acc - filled["acc_lo"].to_numpy(dtype=float)
        above = filled["acc_hi"].to_numpy(dtype=float) - acc
        error_bars = ax.errorbar(lo + width / 2, acc, yerr=np.vstack([below, above]), fmt="none", ecolor="black",
                                 elinewidth=0.8, capsize=2, zorder=6, label="Wilson interval of the accuracy")
    over = conf > acc
    ax.bar(lo[over], (conf - acc)[over], bottom=acc[over], width=width[over], align="edge",
           color=GAP_COLOUR, alpha=0.35, edgecolor=GAP_COLOUR, hatch="//", linewidth=0.5, zorder=3)
    ax.bar(lo[~over], (acc - conf)[~over], bottom=conf[~over], width=width[~over], align="edge",
           facecolor="none", edgecolor=UNDER_COLOUR, hatch="\\\\", linewidth=0.8, zorder=3)
    for bar, n, top in zip(acc_bars, count, np.maximum(acc, conf)):
        if n < sparse:  # a bar this thin in data must not look like evidence
            bar.set_alpha(0.3)
            ax.text(bar.get_x() + bar.get_width() / 2, min(top + 0.02, 0.93), f"n={n}", ha="center", va="bottom",
                    fontsize=6, rotation=90, color="dimgrey", zorder=5)
    (diagonal,) = ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="Perfect calibration",
                          zorder=4)
    # Legend handles drawn for the legend: a container's first bar may be faded or absent.
    patch = matplotlib.patches.Patch
    handles: list[Handle] = [patch(facecolor=ACC_COLOUR, edgecolor="black", label="Accuracy"),
               patch(facecolor=GAP_COLOUR, alpha=0.35, edgecolor=GAP_COLOUR, hatch="//", label="Overconfidence gap"),
               patch(facecolor="none", edgecolor=UNDER_COLOUR, hatch="\\\\", label="Underconfidence gap (in the bar)"),
               diagonal]
    if error_bars is not None:
        handles.append(error_bars)
    if (count < sparse).any():  # explained only where a bar is faded
        handles.append(patch(facecolor=ACC_COLOUR, alpha=0.3, edgecolor="black",
                             label=f"< {sparse} samples: faded, n shown"))
    return handles


def _draw_curve(ax: Axes, curve: pd.DataFrame) -> list[Handle]:
    """The smooth reliability curve and its band over the range of the confidences
    (``attrs["support"]``); returns the legend handles."""
    low, high = curve.attrs.get("support", (0.0, 1.0))
    shown = curve[curve["conf"].between(low, high)]
    band = ax.fill_between(shown["conf"], shown["acc_lo"], shown["acc_hi"], color=CURVE_COLOUR, alpha=0.25,
                           linewidth=0, zorder=7, label=f"its {curve.attrs.get('level', 0.95):.0%} bootstrap band")
    (line,) = ax.plot(shown["conf"], shown["acc"], color=CURVE_COLOUR, linewidth=1.5, zorder=8,
                      label=f"Smooth reliability curve (σ* = {curve.attrs.get('sigma', float('nan')):.3f})")
    return [line, band]


def _histogram(ax: Axes, bins: pd.DataFrame) -> None:
    """Samples per confidence bin (counts), on the diagram's x axis."""
    lo = bins["lo"].to_numpy(dtype=float)
    counts = bins["count"].to_numpy(dtype=float)
    ax.bar(lo, counts, width=bins["hi"].to_numpy(dtype=float) - lo, align="edge", color="grey",
           edgecolor="black", linewidth=0.5, zorder=2)
    ax.set(xlim=(0, 1), xlabel="Confidence", ylabel="Samples")
    ax.grid(alpha=0.3)
    ax.text(0.98, 0.92, f"n = {int(counts.sum()):,}", transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})


Panel = tuple[str, pd.DataFrame, float | None, float | None]


def _grid_figure(panels: Sequence[Panel], ncols: int, title: str,
                 curves: list[pd.DataFrame | None] | None = None) -> Figure:
    """The figure of :func:`reliability_grid`: per panel a diagram over its histogram,
    ``title`` above them all, one legend for all at the bottom."""
    if not panels:
        raise ValueError("reliability_grid needs at least one panel")
    if ncols < 1:
        raise ValueError(f"ncols={ncols} must be at least 1")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    # Constrained layout sizes each gap for what sits in it, so a histogram stays close to
    # its diagram while a row's titles get room (tight_layout makes every gap the widest).
    fig, axes = plt.subplots(2 * nrows, ncols, figsize=(4.4 * ncols, 6.0 * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * nrows}, layout="constrained")
    handles: list[Handle] = []
    for i in range(nrows * ncols):
        top, bottom = axes[2 * (i // ncols), i % ncols], axes[2 * (i // ncols) + 1, i % ncols]
        if i < len(panels):
            panel_title, bins, ece, mce = panels[i]
            curve = curves[i] if curves else None
            drawn = reliability_diagram(bins, None, panel_title, ece, mce, ax=top, legend=False, curve=curve)
            handles = max(handles, drawn, key=len)  # the faded bars' entry if any panel has them
            top.set_xlabel("")
            _histogram(bottom, bins)
        else:
            fig.delaxes(top)
            fig.delaxes(bottom)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, ncols + 1), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def reliability_grid(panels: Sequence[Panel], path: Path | str, ncols: int = 3, title: str = "") -> None:
    """Reliability diagrams side by side, one per ``(title, bins, ece, mce)`` panel, each
    over its confidence histogram; ``title`` says what they all show.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", Figure 1.
    """
    _save(_grid_figure(panels, ncols, title), path)


def confidence_histogram(confidences: np.ndarray, path: Path | str, accuracy: float, mean_confidence: float,
                         n_bins: int = 15, title: str = "") -> None:
    """Fraction of samples per top-label confidence bin on [0, 1], with vertical lines at the
    accuracy and the mean confidence (their distance is the over-confidence at a glance).

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", Figure 1.
    """
    conf = np.asarray(confidences, dtype=float).ravel()
    if conf.size == 0:
        raise ValueError("confidence_histogram got no confidences")
    # Values outside [0, 1] would silently fall off the histogram; they usually mean logits.
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1] (top-label probabilities, not logits)")
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    ax.hist(conf, bins=np.linspace(0, 1, n_bins + 1).tolist(), weights=np.full(conf.size, 1 / conf.size),
            color=ACC_COLOUR, edgecolor="black", linewidth=0.5, zorder=2)
    ax.axvline(accuracy, color="black", linestyle="--", linewidth=1.5, label=f"Accuracy = {accuracy:.4f}", zorder=3)
    ax.axvline(mean_confidence, color=GAP_COLOUR, linestyle="-", linewidth=1.5,
               label=f"Mean confidence = {mean_confidence:.4f}", zorder=3)
    ax.set(xlim=(0, 1), xlabel="Confidence", ylabel="Fraction of samples", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)  # off the data
    _save(fig, path)


class Curve(NamedTuple):
    """One line of :func:`curves_against`: ``y`` ± ``yerr`` at ``x``, named ``label``."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    yerr: Sequence[float]


def _curves_figure(panels: dict[str, list[Curve]], x_name: str, xlabel: str, xscale: str) -> Figure:
    """The figure of :func:`curves_against`, one Axes per panel, not yet saved."""
    if not panels:
        raise ValueError("curves_against needs at least one panel")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes.flat, panels.items()):
        for i, curve in enumerate(curves):
            # Curves often coincide (vector and matrix scaling, none and temperature in
            # accuracy): each has its own marker and dash, the later ones smaller and
            # hollow, so that one drawn over another still shows both.
            ax.errorbar(curve.x, curve.y, yerr=curve.yerr, capsize=3, label=curve.label,
                        marker=CURVE_MARKERS[i % len(CURVE_MARKERS)], linestyle=CURVE_DASHES[i % len(CURVE_DASHES)],
                        markersize=max(3.0, 8.0 - i), markerfacecolor="none" if i % 2 else None)
        values = sorted({float(x) for curve in curves for x in curve.x})
        positive = [x for x in values if x > 0]
        if xscale == "symlog" and positive:
            # Linear up to the smallest positive value: 0 and 0.1 get a decade between them.
            ax.set_xscale("symlog", linthresh=min(positive))
        else:
            ax.set_xscale(xscale)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} against {x_name}")
        # Ticks at the values run, printed as they were given (a symlog axis would print
        # 0.1 as "0" or 1 as "10^0").
        ax.set_xticks(values, [f"{x:g}" for x in values])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    # One legend for all panels (they have the same curves), below them, off the data.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07 * rows, 1, 1))
    return fig


def curves_against(panels: dict[str, list[Curve]], path: Path | str, x_name: str, xlabel: str,
                   xscale: str = "symlog") -> None:
    """Panels side by side, one per ``{y label: curves}`` entry, each curve drawn as
    points with error bars joined by lines; one legend for all, below the panels.

    ``x_name`` is the short name of the x quantity used in the titles (``λ``), ``xlabel``
    the axis label. ``symlog`` keeps x = 0 on a log-like axis (a λ sweep from 0 to 30).
    """
    _save(_curves_figure(panels, x_name, xlabel, xscale), path)


def reliability_with_histogram(bins: pd.DataFrame, path: Path | str, title: str = "", ece: float | None = None,
                               mce: float | None = None, curve: pd.DataFrame | None = None) -> None:
    """A reliability diagram over the number of samples in each of its bins (shared x
    axis), so that a tall gap over a nearly empty bin reads as what it is; ``curve``
    adds the smooth reliability curve (see :func:`reliability_diagram`).

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", Figure 1.
    """
    _save(_grid_figure([(title, bins, ece, mce)], 1, title="", curves=[curve]), path)


def severity_boxes(table: pd.DataFrame, path: Path | str, metrics: Sequence[str] = ("ece", "accuracy"),
                   clean: pd.DataFrame | None = None) -> None:
    """One panel per metric: at each severity, one box per calibrator over the corruptions
    (columns ``severity``, ``calibrator`` and the metrics); ``clean`` (``calibrator`` and
    the metrics) adds the uncorrupted test set at the left as severity 0.

    References: Ovadia et al. 2019, "Can You Trust Your Model's Uncertainty?", Figure 2.
    """
    calibrators = list(dict.fromkeys(table["calibrator"]))
    severities = sorted(table["severity"].unique())
    width = 0.8 / len(calibrators)
    colours = list(matplotlib.colors.TABLEAU_COLORS.values())  # tab10's colours, in its order
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for i, name in enumerate(calibrators):
            offset = (i - (len(calibrators) - 1) / 2) * width
            rows = table[table["calibrator"] == name]
            data = [rows.loc[rows["severity"] == s, metric].to_numpy() for s in severities]
            ax.boxplot(data, positions=np.array(severities, dtype=float) + offset, widths=width * 0.9,
                       patch_artist=True, boxprops={"facecolor": colours[i % 10], "alpha": 0.6},
                       medianprops={"color": "black"}, flierprops={"markersize": 3}, manage_ticks=False)
            if clean is not None and (clean["calibrator"] == name).any():
                value = clean.loc[clean["calibrator"] == name, metric].iloc[0]
                ax.plot([offset], [value], marker="D", color=colours[i % 10], markeredgecolor="black")
            ax.plot([], [], color=colours[i % 10], linewidth=8, alpha=0.6, label=name)
        ticks = ([0] if clean is not None else []) + list(severities)
        ax.set_xticks(ticks, [("clean" if t == 0 else str(t)) for t in ticks])
        ax.set(xlabel="Corruption severity (clean: the test set)", ylabel=metric,
               title=f"{metric}: one box per calibrator over the corruptions")
        ax.grid(alpha=0.3, axis="y")
    # Below the panels: inside, the legend would cover boxes.
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, title="calibrator",
               title_fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    _save(fig, path)


def risk_coverage(curves: pd.DataFrame, path: Path | str, title: str = "",
                  aurc: dict[str, float] | None = None) -> None:
    """Selective risk against coverage, one line per calibrator (columns ``calibrator``,
    ``coverage``, ``risk``), each labelled with its ``aurc`` if given. Lower is better:
    a confidence that ranks the errors last keeps the risk low until coverage reaches the
    accuracy; at full coverage every line reaches its calibrator's error rate.

    References: Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural Networks".
    """
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, rows) in enumerate(curves.groupby("calibrator", sort=False)):
        label = name if aurc is None or name not in aurc else f"{name} (AURC {aurc[name]:.4f})"
        ax.plot(rows["coverage"], rows["risk"], linestyle=CURVE_DASHES[i % len(CURVE_DASHES)],
                marker=CURVE_MARKERS[i % len(CURVE_MARKERS)], markevery=10, markersize=4, label=label)
    ax.set(xlabel="Coverage (share of images answered, most confident first)",
           ylabel="Selective risk (error rate among them)", xlim=(0, 1), ylim=(0, None), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="calibrator", title_fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def in_out_histogram(conf_in: np.ndarray, conf_out: np.ndarray, path: Path | str, in_label: str, out_label: str,
                     title: str = "", n_bins: int = 20) -> None:
    """Top-label confidence of in- and out-of-distribution inputs, each histogram
    normalised to its own count, overlaid: the less they overlap, the better the
    confidence flags the out-of-distribution inputs.

    References: Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks".
    """
    fig, ax = plt.subplots(figsize=(5, 3.6))
    edges = np.linspace(0, 1, n_bins + 1).tolist()
    for values, label, colour in ((conf_in, in_label, ACC_COLOUR), (conf_out, out_label, GAP_COLOUR)):
        values = np.asarray(values, dtype=float)
        ax.hist(values, bins=edges, weights=np.full(values.size, 1 / max(values.size, 1)), alpha=0.5,
                color=colour, edgecolor="black", linewidth=0.4, label=f"{label} (n = {values.size:,})", zorder=2)
    ax.set(xlim=(0, 1), xlabel="Confidence (max probability)", ylabel="Fraction of inputs", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)  # off the data
    _save(fig, path)


# (column of history.csv, its label) per panel of the training curves.
TRAINING_PANELS = {
    "Training loss": [("train_loss", "train loss")],
    "Accuracy": [("train_acc", "train"), ("val_acc", "validation")],
    "Validation ECE": [("val_ece", "validation ECE")],
    "Learning rate (end of epoch)": [("lr", "learning rate")],
}


def training_curves(history: pd.DataFrame, path: Path | str, title: str = "",
                    selected_epoch: int | None = None) -> None:
    """Loss, train and validation accuracy, validation ECE and learning rate against epoch,
    drawn from a run's ``history.csv`` rows (one per epoch). ``selected_epoch``, the epoch
    whose weights the run's tables evaluate, is marked in every panel."""
    if history.empty:
        raise ValueError("training_curves needs at least one epoch of history")
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (ylabel, columns) in zip(axes.flat, TRAINING_PANELS.items()):
        for column, label in columns:
            ax.plot(history["epoch"], history[column], marker="o" if len(history) <= 30 else None,
                    markersize=3, label=label)
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="grey", linestyle=":", linewidth=1,
                       label=f"weights evaluated (epoch {selected_epoch})")
        ax.set(ylabel=ylabel, title=ylabel)
        ax.grid(alpha=0.3)
        if len(columns) > 1 or selected_epoch is not None:
            ax.legend(fontsize=7, loc="best", frameon=False)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        # Whole epochs only: a 3-epoch run must not show ticks at 1.5 and 2.5.
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
