"""Plots: PNG files written atomically, drawn from a hand-made bin table."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from calibrun import plots
from calibrun.plots import Curve, confidence_histogram, curves_against, reliability_diagram, reliability_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    """Each test starts without open figures, and a failing one leaks none into the next."""
    plt.close("all")
    yield
    plt.close("all")


def make_bins(n_bins: int = 5, empty: tuple[int, ...] = (0,)) -> pd.DataFrame:
    """A bin table shaped like metrics.bin_stats, with the bins in ``empty`` holding no sample."""
    edges = np.linspace(0, 1, n_bins + 1)
    count = np.array([0 if b in empty else 10 * (b + 1) for b in range(n_bins)], dtype=np.int64)
    mid = (edges[:-1] + edges[1:]) / 2
    conf = np.where(count > 0, mid, np.nan)
    # Over-confident in the upper bins, under-confident in the lowest filled one.
    acc = np.where(count > 0, np.clip(mid - 0.1 * np.sign(mid - 0.45), 0, 1), np.nan)
    return pd.DataFrame({"bin": np.arange(1, n_bins + 1), "lo": edges[:-1], "hi": edges[1:], "count": count,
                         "conf": conf, "acc": acc})


def read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # Not a blank canvas.
    assert image[..., :3].std() > 0.05
    return image


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_reliability_diagram_writes_png_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "run" / "figures" / "reliability_none.png"
    reliability_diagram(make_bins(15, empty=(0, 1, 2)), path, title="none (test)", ece=0.0412, mce=0.1234)
    read_png(path)
    assert no_temp_files(path.parent)
    assert plt.get_fignums() == []


def test_png_gets_the_usual_file_mode(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    path = tmp_path / "reliability.png"
    reliability_diagram(make_bins(), path)
    assert path.stat().st_mode == reference.stat().st_mode


def test_reliability_diagram_draws_the_given_statistics() -> None:
    bins = make_bins(5, empty=(0, 3))
    bins.loc[bins.index[1], "acc"] = 0.99  # one underconfident bin among overconfident ones
    fig, ax = plt.subplots()
    handles = reliability_diagram(bins, None, title="t", ece=0.0412, mce=0.25, ax=ax)
    filled = bins[bins["count"] > 0]
    acc_bars, over_bars, under_bars = ax.containers
    assert len(acc_bars) == len(filled) == 3 and len(over_bars) + len(under_bars) == 3
    for bar, (_, row) in zip(acc_bars, filled.iterrows()):
        assert bar.get_x() == pytest.approx(row["lo"]) and bar.get_width() == pytest.approx(row["hi"] - row["lo"])
        assert bar.get_height() == pytest.approx(row["acc"])
    # Each gap bar spans accuracy to mean confidence: above the bar when overconfident,
    # inside it (hatched outline, no fill to blend) when underconfident.
    gaps = sorted([*over_bars, *under_bars], key=lambda b: b.get_x())
    for gap, (_, row) in zip(gaps, filled.iterrows()):
        ends = sorted([gap.get_y(), gap.get_y() + gap.get_height()])
        assert ends == pytest.approx(sorted([row["acc"], row["conf"]]))
    assert len(under_bars) == 1 and under_bars[0].get_facecolor()[3] == 0
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Confidence", "Accuracy")
    assert ax.get_title() == "t\nECE = 0.0412 · MCE = 0.2500"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [h.get_label() for h in handles] and "Underconfidence gap (in the bar)" in labels


def test_sparse_bins_are_faded_and_show_their_count() -> None:
    bins = make_bins(4)
    bins["count"] = [1, 50, 0, 200]
    fig, ax = plt.subplots()
    reliability_diagram(bins, None, ax=ax, sparse=10)
    acc_bars = ax.containers[0]
    assert [bar.get_alpha() for bar in acc_bars] == [0.3, None, None]
    assert [t.get_text() for t in ax.texts] == ["n=1"]


def test_every_figure_type_renders_empty_and_one_sample_bins(tmp_path: Path) -> None:
    from calibrun.plots import in_out_histogram, reliability_with_histogram, severity_boxes

    bins = make_bins(10, empty=(0, 1, 2, 3, 4, 5, 6, 7))
    bins.loc[bins.index[8], "count"] = 1
    reliability_with_histogram(bins, tmp_path / "one.png", "one sample", 0.5, 0.5)
    reliability_with_histogram(make_bins(10, empty=tuple(range(10))), tmp_path / "none.png")
    reliability_grid([("a", bins, 0.1, 0.2), ("b", make_bins(10, empty=tuple(range(10))), 0.0, 0.0)],
                     tmp_path / "grid.png")
    table = pd.DataFrame({"severity": [1, 1, 2], "calibrator": ["none", "temperature", "none"],
                          "ece": [0.1, 0.05, 0.2], "accuracy": [0.9, 0.9, 0.8]})
    severity_boxes(table, tmp_path / "boxes.png")
    in_out_histogram(np.array([0.9]), np.array([0.2, 0.3]), tmp_path / "ood.png", "in", "out")
    confidence_histogram(np.array([1.0]), tmp_path / "conf.png", accuracy=1.0, mean_confidence=1.0)
    for name in ("one", "none", "grid", "boxes", "ood", "conf"):
        assert read_png(tmp_path / f"{name}.png").shape[0] > 100


def test_reliability_diagram_into_ax_saves_nothing(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    path = tmp_path / "not_written.png"
    reliability_diagram(make_bins(), path, ax=ax)
    assert not path.exists()


def test_all_bins_empty_and_no_scores_still_draws(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    reliability_diagram(make_bins(10, empty=tuple(range(10))), path)
    read_png(path)


def test_reliability_diagram_rejects_a_table_without_bin_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bin_stats"):
        reliability_diagram(pd.DataFrame({"lo": [0.0], "hi": [1.0]}), tmp_path / "x.png")
    with pytest.raises(ValueError, match="path"):
        reliability_diagram(make_bins(), None)


def test_overwrite_replaces_and_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "figures" / "reliability.png"
    reliability_diagram(make_bins(), path, ece=0.1, mce=0.2)
    reliability_diagram(make_bins(15), path, ece=0.3, mce=0.4)
    before = path.read_bytes()

    def crash(self, fname, **kwargs):
        fname.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", crash)
    with pytest.raises(OSError, match="disk full"):
        reliability_diagram(make_bins(), path, ece=0.5, mce=0.6)
    assert path.read_bytes() == before
    assert no_temp_files(path.parent)
    assert plt.get_fignums() == []


def test_confidence_histogram(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.beta(8, 1, size=500), [1.0, 0.1]])
    path = tmp_path / "a" / "b" / "confidence_hist.png"
    confidence_histogram(conf, path, accuracy=0.81, mean_confidence=float(conf.mean()), n_bins=15, title="none")
    read_png(path)
    assert no_temp_files(path.parent)


def test_confidence_histogram_shows_fractions_and_both_lines(tmp_path: Path, monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    confidence_histogram(np.array([0.05, 0.55, 0.95, 1.0]), tmp_path / "h.png", accuracy=0.5,
                         mean_confidence=0.6375, n_bins=10)
    (ax,) = figures[0].axes
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 10 and sum(heights) == pytest.approx(1.0)
    assert heights[0] == pytest.approx(0.25) and heights[-1] == pytest.approx(0.5)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["Accuracy = 0.5000", "Mean confidence = 0.6375"]
    assert [line.get_xdata()[0] for line in ax.lines] == [0.5, 0.6375]


@pytest.mark.parametrize("conf", [np.array([]), np.array([0.5, 1.5]), np.array([0.5, np.nan])])
def test_confidence_histogram_rejects_bad_input(tmp_path: Path, conf: np.ndarray) -> None:
    with pytest.raises(ValueError):
        confidence_histogram(conf, tmp_path / "h.png", accuracy=0.5, mean_confidence=0.5)
    assert not (tmp_path / "h.png").exists()


@pytest.mark.parametrize(("n_panels", "ncols", "shape"), [(1, 3, (1, 1)), (3, 3, (1, 3)), (4, 3, (2, 3)),
                                                         (5, 2, (3, 2))])
def test_grid_has_one_diagram_and_one_histogram_per_panel(n_panels: int, ncols: int, shape: tuple[int, int]) -> None:
    panels = [(f"calibrator {i}", make_bins(15, empty=(i,)), 0.01 * i, 0.1 * i) for i in range(n_panels)]
    fig = plots._grid_figure(panels, ncols, title="")
    assert len(fig.axes) == 2 * n_panels
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    assert (rows // 2, cols) == shape  # a diagram row and a histogram row per row of panels
    diagrams = [ax for ax in fig.axes if ax.get_ylabel() == "Accuracy"]
    assert [ax.get_title().split("\n")[0] for ax in diagrams] == [p[0] for p in panels]
    assert sum(ax.get_ylabel() == "Samples" for ax in fig.axes) == n_panels


def test_reliability_grid_writes_png(tmp_path: Path) -> None:
    panels = [(name, make_bins(15, empty=(0, 1)), 0.02, 0.08) for name in ("none", "temperature", "vector")]
    path = tmp_path / "out" / "grid.png"
    reliability_grid(panels, path, ncols=2)
    image = read_png(path)
    # Two columns, two rows: about as tall as wide.
    assert 0.7 < image.shape[0] / image.shape[1] < 1.4
    with pytest.raises(ValueError):
        reliability_grid([], tmp_path / "none.png")


def make_curves() -> list[Curve]:
    return [Curve("ce, none", [0.0, 1.0, 10.0], [0.10, 0.05, 0.02], [0.01, 0.0, 0.005]),
            Curve("gap_cap, none", [0.0, 10.0], [0.2, 0.1], [0.0, 0.02])]


def test_curves_against_draws_the_given_numbers(tmp_path: Path, monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    curves = make_curves()
    curves_against({"ece": curves, "accuracy": curves[:1]}, tmp_path / "c.png", x_name="λ", xlabel="λ (loss.lam)")
    ece_ax, acc_ax = figures[0].axes
    assert [ax.get_ylabel() for ax in (ece_ax, acc_ax)] == ["ece", "accuracy"]
    assert ece_ax.get_title() == "ece against λ" and ece_ax.get_xlabel() == "λ (loss.lam)"
    assert ece_ax.get_xscale() == "symlog"
    assert len(ece_ax.containers) == 2 and len(acc_ax.containers) == 1
    for container, curve in zip(ece_ax.containers, curves):
        data_line, _, (bars,) = container
        np.testing.assert_allclose(np.asarray(data_line.get_xdata(), dtype=float), curve.x)
        np.testing.assert_allclose(np.asarray(data_line.get_ydata(), dtype=float), curve.y)
        # Each error bar spans y - yerr to y + yerr.
        spans = [(segment[0][1], segment[1][1]) for segment in bars.get_segments()]
        np.testing.assert_allclose(spans, [(y - e, y + e) for y, e in zip(curve.y, curve.yerr)])
    # One legend for the figure, below the panels: they share their curves.
    (legend,) = figures[0].legends
    assert [t.get_text() for t in legend.get_texts()] == ["ce, none", "gap_cap, none"]
    assert ece_ax.get_legend() is None and acc_ax.get_legend() is None


def test_curves_that_coincide_stay_distinguishable(tmp_path: Path, monkeypatch) -> None:
    """Vector and matrix scaling often give the same ECE: each curve has its own marker
    and dash, so one drawn over another does not hide it."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    same = [Curve(name, [0.0, 1.0, 10.0], [0.1, 0.05, 0.02], [0.0] * 3) for name in ("none", "temperature", "vector", "matrix")]
    curves_against({"ece": same}, tmp_path / "c.png", x_name="λ", xlabel="λ")
    lines = [container[0] for container in figures[0].axes[0].containers]
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == len(same)


def test_the_faded_bin_entry_is_in_the_legend_only_when_a_bin_is_faded() -> None:
    full = make_bins(5, empty=())  # 10 to 50 samples per bin: none below SPARSE
    sparse = full.assign(count=[3, 20, 30, 40, 50])
    for bins, faded in ((full, False), (sparse, True)):
        fig, ax = plt.subplots()
        handles = reliability_diagram(bins, None, ax=ax, sparse=10)
        assert any("faded" in h.get_label() for h in handles) is faded
        plt.close(fig)
    grid = plots._grid_figure([("a", sparse, 0.1, 0.2), ("b", full, 0.1, 0.2)], 2, title="calibrator: none")
    (legend,) = grid.legends
    assert any("faded" in t.get_text() for t in legend.get_texts())  # one panel has a faded bar
    assert grid.get_suptitle() == "calibrator: none"
    plt.close(grid)


def test_curves_against_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "report" / "ece_vs_lam.png"
    curves_against({"ece": make_curves(), "accuracy": make_curves()}, path, x_name="λ", xlabel="λ")
    image = read_png(path)
    # Two panels side by side: wider than tall.
    assert image.shape[1] > 1.8 * image.shape[0]
    assert no_temp_files(path.parent) and plt.get_fignums() == []
    with pytest.raises(ValueError, match="panel"):
        curves_against({}, tmp_path / "none.png", x_name="λ", xlabel="λ")


def test_lambda_ticks_read_as_the_values_run() -> None:
    curve = Curve("gap_cap, none", [0, 0.1, 1, 10], [0.1, 0.09, 0.05, 0.03], [0.01] * 4)
    fig = plots._curves_figure({"ece": [curve]}, "λ", "λ (loss.lam)", "symlog")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.1", "1", "10"]
    positions = ax.transData.transform([(x, 0) for x in (0, 0.1, 1)])[:, 0]
    assert positions[1] - positions[0] > 0.5 * (positions[2] - positions[1]), "0 and 0.1 are told apart"
    assert ax.get_legend() is None and len(fig.legends) == 1  # the legend sits below the panels
