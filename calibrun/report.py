"""Per-run tables and figures from saved logits (DESIGN §7).

``calibrate_and_report`` is the one place where calibrators, metrics and plots meet: it
reads ``logits/{val,test}.npz``, fits every calibrator on ``val``, evaluates ``none``
and each calibrator on both splits, and writes ``metrics.csv``, ``metrics.md``,
``bins.csv`` and ``figures/``. It needs no model and no data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibrun._io import atomic_write_text
from calibrun.calibrators import Calibrator, Uncalibrated
from calibrun.metrics import bin_stats, evaluate
from calibrun.plots import confidence_histogram, reliability_diagram

METRIC_COLUMNS = ["split", "calibrator", "accuracy", "ece", "mce", "ada_ece", "classwise_ece", "oe", "nll", "brier", "n"]
BIN_COLUMNS = ["calibrator", "bin", "lo", "hi", "count", "conf", "acc"]


def load_logits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["logits"], f["labels"]


def calibrate_and_report(run_dir: Path, calibrators: dict[str, Calibrator], n_bins: int = 15) -> pd.DataFrame:
    """Fit each calibrator on the val logits, evaluate on val and test, write the tables.

    ``none`` (the uncalibrated softmax) is always reported first. Val rows of fitted
    calibrators are in-sample; the test rows are the ones to compare. Rows and bins of
    calibrators already in the run's tables but not given here are kept, so a refit
    of a subset (``calibrun-calibrate``) does not erase the others. Returns the table.
    """
    val_z, val_y = load_logits(run_dir / "logits" / "val.npz")
    test_z, test_y = load_logits(run_dir / "logits" / "test.npz")
    rows, bins = [], []
    for name, calibrator in {"none": Uncalibrated(), **calibrators}.items():
        calibrator.fit(val_z, val_y)
        for split, (z, y) in {"val": (val_z, val_y), "test": (test_z, test_y)}.items():
            probs = calibrator.predict_proba(z)
            scores = evaluate(probs, y, n_bins)
            rows.append({"split": split, "calibrator": name, **scores})
            if split != "test":
                continue
            stats = bin_stats(probs, y, n_bins)
            bins.append(stats.assign(calibrator=name))
            reliability_diagram(stats, run_dir / "figures" / f"reliability_{name}.png",
                                title=f"{name} (test)", ece=scores["ece"], mce=scores["mce"])
            if name == "none":
                conf = probs.max(axis=1)
                confidence_histogram(conf, run_dir / "figures" / "confidence_hist.png",
                                     accuracy=scores["accuracy"], mean_confidence=float(conf.mean()),
                                     n_bins=n_bins, title="uncalibrated (test)")
    table = _keep_others(run_dir / "metrics.csv", pd.DataFrame(rows, columns=METRIC_COLUMNS))
    write_run_tables(run_dir, table, _keep_others(run_dir / "bins.csv", pd.concat(bins)[BIN_COLUMNS]))
    return table


def _keep_others(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus the rows of ``path`` whose calibrator ``new`` does not cover."""
    if not path.exists():
        return new.reset_index(drop=True)
    old = pd.read_csv(path)
    return pd.concat([new, old[~old["calibrator"].isin(new["calibrator"])]], ignore_index=True)


def write_run_tables(run_dir: Path, table: pd.DataFrame, bins: pd.DataFrame) -> None:
    atomic_write_text(run_dir / "metrics.csv", table.to_csv(index=False))
    atomic_write_text(run_dir / "metrics.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")
    atomic_write_text(run_dir / "bins.csv", bins.to_csv(index=False))
