"""Paired comparisons of groups of runs on the same test images (``calibrun-report --baseline``).

Two runs with the same seed evaluated on the same test images are compared image by
image: each run's calibrator is applied to its saved test logits (``logits/test.npz``,
whose ``index`` says which dataset image each row is), the images both runs have are
matched, and one set of bootstrap resamples of those images is drawn for both
(``calibrun.bootstrap``), so that the difference of a metric is resampled as a pair.
Over seeds the differences are averaged, resample by resample (each seed with its own
resamples), which gives the interval of the mean difference over seeds. Across the
table's comparisons the p-values are corrected with Holm's step-down procedure, so that
a mark means significant with the whole table in view.

References: Efron & Tibshirani (1993), "An Introduction to the Bootstrap", §16.4
(bootstrap tests and their achieved significance level); Holm (1979), "A Simple
Sequentially Rejective Multiple Test Procedure".
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from calibrun import UserError, bootstrap
from calibrun.calibration import load_calibrators
from calibrun.metrics import METRIC_NAMES, metric, scores
from calibrun.runfolder import logits_file

log = logging.getLogger(__name__)
COLUMNS = ["calibrator", "metric", "seeds", "images", "difference", "lo", "hi", "p", "p_holm", "significant", "better"]


def parse_baseline(text: str, keys: list[str]) -> dict[str, str]:
    """``--baseline loss=ce,loss.lam=1`` as {key: value}; the keys must be among the
    config keys that tell the report's groups apart."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise UserError(f"--baseline {text!r}: give the baseline group as key=value[,key=value], e.g. loss=ce.")
    unknown = [key for key, _ in pairs if key not in keys]
    if unknown:
        raise UserError(f"--baseline: {', '.join(unknown)} does not tell the runs apart; the keys that do: "
                        f"{', '.join(keys) or '(none: the runs differ only in seed)'}.")
    return dict(pairs)


def _as_text(value: object) -> str:
    return "" if pd.isna(value) else str(int(value) if isinstance(value, float) and value.is_integer() else value)


@functools.lru_cache(maxsize=64)
def _test_probabilities(run: str, calibrator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A run's calibrated test probabilities, labels and image index (None if not saved)."""
    with np.load(logits_file(Path(run), "test")) as data:
        logits, labels = data["logits"], data["labels"]
        index = data["index"] if "index" in data else None
    return load_calibrators(Path(run))[calibrator].predict_proba(logits), labels, index


def _paired_images(base: tuple, other: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """Rows of the two runs' test sets that hold the same images, or None if none do.

    With an image index on both sides the images both have are matched; logits made
    elsewhere (no index) are paired row by row when their labels agree row for row."""
    (_, labels_a, index_a), (_, labels_b, index_b) = base, other
    if index_a is None or index_b is None:
        same = len(labels_a) == len(labels_b) and np.array_equal(labels_a, labels_b)
        return (np.arange(len(labels_a)), np.arange(len(labels_b))) if same else None
    _, rows_a, rows_b = np.intersect1d(index_a, index_b, return_indices=True)
    if not len(rows_a) or not np.array_equal(labels_a[rows_a], labels_b[rows_b]):
        return None
    return rows_a, rows_b


def _differences(base_run: str, run: str, calibrator: str, n_bins: int,
                 settings: bootstrap.Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(point differences, their population values, resampled differences (metrics ×
    resamples), images) of one pair of runs, ``run`` minus ``base_run``; None when they
    share no test images."""
    base, other = _test_probabilities(base_run, calibrator), _test_probabilities(run, calibrator)
    rows = _paired_images(base, other)
    if rows is None:
        log.warning("Not compared: %s and %s share no test images (or their labels differ).", base_run, run)
        return None
    (p_a, labels, _), (p_b, _, _) = base, other
    a, b, y = p_a[rows[0]], p_b[rows[1]], labels[rows[0]]
    scored_a, scored_b = scores(a, y, n_bins), scores(b, y, n_bins)
    point_a, point_b = (np.array([scored[name] for name in METRIC_NAMES]) for scored in (scored_a, scored_b))
    point = point_b - point_a
    population = bootstrap.population_values(b, y, n_bins, point_b) - bootstrap.population_values(a, y, n_bins, point_a)
    resampled = bootstrap.resampled(b, y, n_bins, settings) - bootstrap.resampled(a, y, n_bins, settings)
    return point, population, resampled, len(y)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: the i-th smallest times (m − i + 1), made
    non-decreasing, capped at 1."""
    order = np.argsort(p_values)
    scaled = np.minimum(1.0, p_values[order] * (len(p_values) - np.arange(len(p_values))))
    adjusted = np.empty_like(p_values)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def compare_to_baseline(metrics: pd.DataFrame, keys: list[str], baseline: dict[str, str], shown: list[str],
                        n_bins: int, settings: bootstrap.Settings) -> pd.DataFrame:
    """One row per (group, calibrator, shown metric) beside the baseline group's runs:
    the mean over matching seeds of the paired difference, its interval, the bootstrap
    p-value and its Holm correction over the table, and whether it is significant at
    ``settings.level`` and on the better side. ``metrics`` are the report's rows (run,
    seed, the varying ``keys``, calibrator)."""
    runs = metrics.drop_duplicates(["run", "calibrator"])
    text = runs[keys].map(_as_text) if keys else pd.DataFrame(index=runs.index)
    is_base = np.logical_and.reduce([text[k] == v for k, v in baseline.items()])
    if not is_base.any():
        groups = sorted({", ".join(f"{k}={v}" for k, v in zip(keys, row)) for row in text.itertuples(index=False)})
        raise UserError(f"--baseline {', '.join(f'{k}={v}' for k, v in baseline.items())}: no finished run is in "
                        f"that group; the groups: {'; '.join(groups)}.")
    base = runs[is_base]
    rows = []
    for values, group in runs[~is_base].groupby([*keys, "calibrator"], dropna=False, sort=False):
        calibrator = values[-1]
        pairs = [(b.run, g.run) for g in group.itertuples() for b in base.itertuples()
                 if b.calibrator == calibrator and b.seed == g.seed]
        found = [d for i, (b, g) in enumerate(pairs)
                 if (d := _differences(b, g, calibrator, n_bins, settings._replace(seed=settings.seed + i)))]
        if found:
            rows.append((values, found))
    return _table(rows, keys, shown, settings)


def _table(rows: list[tuple[tuple, list]], keys: list[str], shown: list[str],
           settings: bootstrap.Settings) -> pd.DataFrame:
    """The comparison rows: each group's differences averaged over its seeds."""
    out = []
    for values, found in rows:
        point, population, resampled = (np.mean([d[i] for d in found], axis=0) for i in range(3))
        lo, hi = bootstrap.interval(resampled, point, settings, population)
        p = bootstrap.p_value(resampled, point, settings, population)
        for i, name in enumerate(METRIC_NAMES):
            if name in shown:
                better = point[i] > 0 if metric(name).higher_is_better else point[i] < 0
                out.append({**dict(zip([*keys, "calibrator"], values)), "metric": name, "seeds": len(found),
                            "images": int(np.mean([d[3] for d in found])), "difference": point[i], "lo": lo[i],
                            "hi": hi[i], "p": p[i], "better": bool(better)})
    table = pd.DataFrame(out, columns=[*keys, *COLUMNS])
    if len(table):
        table["p_holm"] = holm(table["p"].to_numpy(dtype=float))
        table["significant"] = table["p_holm"] < 1 - settings.level
    return table


def markdown(table: pd.DataFrame, keys: list[str], baseline: dict[str, str], settings: bootstrap.Settings) -> list[str]:
    """The report's section: difference [interval] per metric, * where significant after Holm."""
    name = ", ".join(f"{k}={v}" for k, v in baseline.items())
    lines = [f"## Paired differences to {name}", "",
             f"Each group minus {name} on the same test images, the mean over matching seeds; brackets: the "
             f"{settings.level:.0%} {settings.interval} bootstrap interval ({settings.resamples} resamples per seed); "
             f"* significant at {1 - settings.level:.2g} after Holm's correction over the {len(table)} comparisons "
             "in this table. A negative difference is lower than the baseline's (better for all but accuracy).", ""]
    if not len(table):
        return [*lines, "No group shares test images and seeds with the baseline.", ""]
    columns = zip(table["difference"], table["lo"], table["hi"], table["significant"])
    cells = table.assign(cell=[f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]{'*' if marked else ''}"
                               for d, lo, hi, marked in columns])
    index = [*keys, "calibrator", "seeds"]
    cells[index] = cells[index].map(_as_text)
    wide = cells.pivot_table(index=index, columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in METRIC_NAMES if m in wide.columns]]
    return [*lines, wide.reset_index().to_markdown(index=False, disable_numparse=True), ""]
