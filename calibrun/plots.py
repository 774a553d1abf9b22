"""Reliability diagrams and confidence histograms (matplotlib, Agg).

The plots draw bin statistics computed by ``calibrun.metrics.bin_stats``; no metric
formula lives here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ACC_COLOUR = "#1f5fbf"
GAP_COLOUR = "#d62728"


def _save(fig: plt.Figure, path: Path | str) -> None:
    """Save atomically: a partly written PNG never replaces a good one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)


def draw_reliability(ax: plt.Axes, bins: pd.DataFrame, title: str = "", ece: float | None = None,
                     mce: float | None = None) -> None:
    """Blue bars: accuracy per non-empty bin; red bars: the gap up or down to the bin's
    mean confidence; dashed: perfect calibration.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", Figure 1.
    """
    filled = bins[bins["count"] > 0]
    width = (filled["hi"] - filled["lo"]).to_numpy()
    left = filled["lo"].to_numpy()
    acc, conf = filled["acc"].to_numpy(), filled["conf"].to_numpy()
    ax.bar(left, acc, width=width, align="edge", color=ACC_COLOUR, edgecolor="black", linewidth=0.6, label="Accuracy")
    ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color=GAP_COLOUR, alpha=0.35,
           edgecolor=GAP_COLOUR, hatch="//", linewidth=0.6, label="Gap")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="Perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence", ylabel="Accuracy", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    text = "\n".join(f"{name} = {value:.4f}" for name, value in (("ECE", ece), ("MCE", mce)) if value is not None)
    if text:
        ax.text(0.97, 0.03, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})


def reliability_diagram(bins: pd.DataFrame, path: Path | str, title: str = "", ece: float | None = None,
                        mce: float | None = None) -> None:
    """One reliability diagram, saved as a PNG."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    draw_reliability(ax, bins, title, ece, mce)
    _save(fig, path)


def reliability_grid(panels: list[tuple[str, pd.DataFrame, float, float]], path: Path | str, ncols: int = 3) -> None:
    """Reliability diagrams side by side: one (title, bins, ece, mce) per panel."""
    nrows = -(-len(panels) // ncols)
    cols = min(ncols, len(panels))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.2 * nrows), squeeze=False)
    for ax, (title, bins, ece, mce) in zip(axes.flat, panels):
        draw_reliability(ax, bins, title, ece, mce)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _save(fig, path)


def confidence_histogram(confidences: np.ndarray, path: Path | str, accuracy: float, mean_confidence: float,
                         n_bins: int = 15, title: str = "") -> None:
    """Share of samples per confidence bin, with the accuracy and mean-confidence lines."""
    conf = np.asarray(confidences, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.hist(conf, bins=np.arange(n_bins + 1) / n_bins, weights=np.full(len(conf), 1 / len(conf)),
            color=ACC_COLOUR, edgecolor="black", linewidth=0.6)
    ax.axvline(accuracy, color="black", linestyle="--", label=f"Accuracy {accuracy:.3f}")
    ax.axvline(mean_confidence, color=GAP_COLOUR, linestyle="-", label=f"Mean confidence {mean_confidence:.3f}")
    ax.set(xlim=(0, 1), xlabel="Confidence", ylabel="Share of samples", title=title)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
