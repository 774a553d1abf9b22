"""``calibrun-report``: one table and a few figures from many run folders.

Finds the run folders below the given paths, groups the finished ones by the config keys
that differ between them (leaving out ``calibrun.config.NON_EXPERIMENT_KEYS``, the seed
and the calibrator settings) and the calibrator, and writes mean ± std over seeds. The
per-run tables it reads are written by ``calibrun.calibration``; the figures are drawn by
``calibrun.plots`` from the numbers computed here. Scalar fitted parameters of the
calibrators (``calibrators.json``: temperature scaling's T, say) are reported beside the
metrics as ``<calibrator>.<name>`` columns, filled on that calibrator's rows only.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
import pandas as pd
import yaml
from scipy import stats

from calibrun import UserError, bootstrap
from calibrun.calibration import DECISION_PREFIXES, decision_columns
from calibrun.comparison import compare_to_baseline, parse_baseline
from calibrun.comparison import markdown as comparison_markdown
from calibrun._io import atomic_write_text
from calibrun.config import is_non_experiment_key
from calibrun.detection import DETECTION_METRICS
from calibrun.metrics import METRIC_NAMES, pool_bins
from calibrun.plots import Curve, curves_against, reliability_grid
from calibrun.runfolder import (BINS, CALIBRATOR_PARAMS, CONFIG, EXTERNAL_SOURCE, METRICS, STATUS, BrokenFile,
                                group_choices, is_done, read_run_file, read_run_table)

PAPERS = Path(__file__).resolve().parent / "papers"
# The metrics a report's table shows unless --table-metrics says otherwise.
TABLE_METRICS = ("accuracy", "ece", "mce", "nll", "brier")
# The level of the t-intervals over seeds and of --baseline's paired intervals.
LEVEL = 0.95
# conf/config.yaml's metrics.n_bins, for --baseline on runs whose config lacks it.
DEFAULT_BINS = 15
log = logging.getLogger(__name__)
# Settings named in a report's "Same for all runs" line when no group differs in them
# (model.depth too: model=resnet110 with model.depth=56 is a ResNet-56).
SHARED_SETTINGS = ("data", "model", "model.depth", "loss", "trainer.epochs", "trainer.batch_size",
                   "data.train_subset", "data.test_subset")


def splits_groups(key: str) -> bool:
    """Whether two runs that differ in config ``key`` belong to different report groups.

    Beyond the keys that never make two runs different experiments, the seed is what the
    groups aggregate over, and calibrator settings are reported per calibrator row.
    """
    return not is_non_experiment_key(key) and key != "seed" and not key.startswith("calibrator.")


def find_runs(paths: list[Path]) -> list[Path]:
    """Every run folder at or below ``paths``: a training run holds ``.hydra/``, a folder of
    logits made elsewhere (``calibrun-calibrate --out``) holds ``source.json``."""
    runs = {marker.parent.resolve() for path in paths for name in (".hydra", EXTERNAL_SOURCE)
            for marker in Path(path).rglob(name)}
    return sorted(runs)


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(node) if isinstance(node, list) else node}


def describe_run(run_dir: Path) -> dict[str, object]:
    """The run's state, its config choices (data, model, loss, ...) and flattened config."""
    status = {"state": "unknown", "error": None}
    if (run_dir / STATUS).is_file():
        status.update(read_run_file(run_dir / STATUS, json.loads, dict))
    config_file = run_dir / CONFIG if (run_dir / CONFIG).is_file() else run_dir / ".hydra" / CONFIG
    config = read_run_file(config_file, yaml.safe_load, dict) if config_file.is_file() else {}
    choices = group_choices(run_dir)
    state = "done" if is_done(run_dir) else status["state"]
    info: dict[str, object] = {"run": str(run_dir), "state": state, "error": status.get("error"),
                               "seed": config.get("seed")}
    info.update({k: v for k, v in (choices or {}).items() if k in ("data", "model", "loss", "experiment") and v})
    info.update({k: v for k, v in _flatten(config).items() if splits_groups(k) and not k.endswith("_target_")})
    return info


def calibrator_params(run_dir: Path) -> dict[str, dict[str, float]]:
    """The scalar fitted parameters in the run's ``calibrators.json``: calibrator name ->
    {``<calibrator>.<parameter>``: value}. Every real number becomes an entry; lists (a
    vector scaling's weights, bin edges) do not. A run without the file has none."""
    path = run_dir / CALIBRATOR_PARAMS
    if not path.is_file():
        return {}
    params = read_run_file(path, json.loads, dict)
    return {name: {f"{name}.{key}": float(value) for key, value in fitted.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for name, fitted in params.items() if isinstance(fitted, dict)}


def _with_params(rows: pd.DataFrame, params: dict[str, dict[str, float]]) -> pd.DataFrame:
    """``rows`` (one run's metric rows) plus a column per scalar fitted parameter, filled on
    the rows of the calibrator it belongs to and NaN elsewhere."""
    rows = rows.copy()
    for name, values in params.items():
        for column, value in values.items():
            rows[column] = rows["calibrator"].eq(name).map({True: value, False: float("nan")}).astype(float)
    return rows


def param_columns(metrics: pd.DataFrame) -> list[str]:
    """The fitted-parameter columns of ``metrics``: ``<calibrator>.<name>`` for a calibrator
    among its rows (config keys such as ``loss.lam`` start with a config group instead)."""
    if "calibrator" not in metrics:
        return []
    names = set(metrics["calibrator"].dropna())
    return sorted(c for c in metrics.columns if "." in c and c.split(".", 1)[0] in names)


def collect(paths: list[Path], split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(metric rows of finished runs, one row per run, the config keys that differ)."""
    runs = [_read_run(r) for r in find_runs(paths)]
    if not runs:
        raise UserError(f"No run folders (with .hydra/ or source.json) under {', '.join(map(str, paths))}.")
    infos = [run.info for run in runs]
    table = pd.DataFrame([{k: v for k, v in info.items() if not k.startswith("_")} for info in infos])
    config_keys = [c for c in table.columns if c not in ("run", "state", "error", "seed")]
    # A run that failed before writing its resolved config would make every key "differ".
    done = [info for info in infos if info["state"] == "done"] or infos
    varying = varying_keys(done, config_keys)
    rows = []
    for run in runs:
        if run.results is not None:
            metrics, params = run.results
            labels = {k: run.info.get(k) for k in ["run", "seed", *varying]}
            chosen = metrics[metrics["split"] == split].assign(**labels)
            rows.append(_with_params(chosen, params))
    metrics = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["run", "calibrator", *METRIC_NAMES])
    return metrics, table, varying


def varying_keys(runs: list[dict[str, object]], keys: list[str]) -> list[str]:
    """The config keys that tell ``runs`` apart: those with more than one value among the
    runs that have them, and the settings only some of the chosen components have when
    the choice differs (``loss.lam`` of gap beside ce). A key that only some runs have,
    with one value (a trained run's ``trainer.*`` beside logits made elsewhere), does not
    split them by itself, nor does a setting all the components share (``num_classes``),
    nor one that is null wherever it is set (ResNet's ``stage_widths`` beside a ViT)."""
    def count(key: str) -> int:
        return len({str(run[key]) for run in runs if key in run})

    def shown_beside_a_lack(key: str) -> bool:
        owners = [run for run in runs if key in run]
        return (len(owners) < len(runs) and any(run[key] is not None for run in owners)
                and count(key.split(".")[0]) > 1)

    return [key for key in keys if count(key) > 1 or ("." in key and shown_beside_a_lack(key))]


class _Run(NamedTuple):
    """A run folder as :func:`collect` reads it: :func:`describe_run`'s ``info`` and, for a
    finished run, its metric rows and fitted parameters (``results``)."""

    info: dict[str, object]
    results: tuple[pd.DataFrame, dict[str, dict[str, float]]] | None = None


def _read_run(run_dir: Path) -> _Run:
    """:func:`describe_run`, plus a finished run's metric rows and fitted parameters; a run
    with an unreadable file comes back as ``broken``."""
    try:
        info = describe_run(run_dir)
        if info["state"] == "done" and (run_dir / METRICS).is_file():
            metrics = with_every_metric(read_run_table(run_dir / METRICS, ("split", "calibrator", "accuracy")))
            return _Run(info, (metrics, calibrator_params(run_dir)))
        return _Run(info)
    except BrokenFile as err:
        log.warning("Broken run folder, listed but not reported: %s", err)
        return _Run({"run": str(run_dir), "state": "broken", "error": str(err), "seed": None})


def with_every_metric(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a column for each metric: a run evaluated before a metric existed
    has none for it, and its cells stay empty."""
    return table.reindex(columns=[*table.columns, *(m for m in METRIC_NAMES if m not in table)])


def aggregate(metrics: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, standard deviation (over seeds) and n per group and calibrator, for every
    metric, selective risk, conformal-set column and fitted parameter, and each metric's
    and column's t-interval of the mean (``_t_lo``, ``_t_hi``)."""
    groups = [*keys, "calibrator"]
    grouped = metrics.groupby(groups, dropna=False, sort=False)
    values = [*METRIC_NAMES, *decision_columns(metrics)]
    out = grouped[[*values, *param_columns(metrics)]].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out.insert(0, "n", grouped.size())
    for metric in values:
        out[f"{metric}_t_lo"], out[f"{metric}_t_hi"] = t_interval(out[f"{metric}_mean"], out[f"{metric}_std"], out["n"])
    if "collapsed" in metrics:  # runs evaluated before the flag existed count as not collapsed
        out.insert(1, "collapsed", grouped["collapsed"].agg(lambda flags: int(flags.fillna(False).astype(bool).sum())))
    return out.reset_index()


def t_interval(mean: ArrayLike, std: ArrayLike, n: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The Student-t interval of a mean over n seeds at :data:`LEVEL` (NaN below two seeds)."""
    n = np.asarray(n, dtype=float)
    half = stats.t.ppf((1 + LEVEL) / 2, np.where(n > 1, n - 1, np.nan)) * np.asarray(std, dtype=float) / np.sqrt(n)
    return np.asarray(mean, dtype=float) - half, np.asarray(mean, dtype=float) + half


def _mean_std(mean: float, std: float, n: int) -> str:
    """A table cell, mean ± std [t-interval of the mean]; empty where the value does not
    apply (T on a row that is not temperature's)."""
    if pd.isna(mean):
        return ""
    if n < 2 or pd.isna(std):
        return f"{mean:.4f}"
    lo, hi = t_interval(mean, std, n)
    return f"{mean:.4f} ± {std:.4f} [{float(lo):.4f}, {float(hi):.4f}]"


def markdown(summary: pd.DataFrame, keys: list[str], metrics: list[str], paper: pd.DataFrame | None) -> str:
    """Mean ± std of each metric per row, the paper's value beside it; "–" for a key a group
    lacks (λ of ce), an empty cell for a value that does not apply. Cells are printed as
    written (no number parsing), so every value keeps its four decimals."""
    shown = summary[[*keys, "calibrator", "n"]].astype(object)
    shown[keys] = shown[keys].map(lambda v: "–" if pd.isna(v) else as_written(v))
    if "paper_label" in summary:  # the paper's name for the row (papers/<name>.csv, column label)
        shown.insert(0, "row", summary["paper_label"].fillna(""))
    if "collapsed" in summary and summary["collapsed"].any():
        shown["collapsed"] = [f"{k} of {n}" if k else "" for k, n in zip(summary["collapsed"], summary["n"])]
    for metric in metrics:
        shown[metric] = [_mean_std(m, s, n)
                         for m, s, n in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n"])]
        if paper is not None and f"paper_{metric}" in summary:
            shown[f"paper {metric}"] = summary[f"paper_{metric}"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    return shown.to_markdown(index=False, disable_numparse=True)


def load_paper(name_or_path: str) -> pd.DataFrame:
    """Published numbers: a CSV whose columns are config keys (``loss``, ``data.target``, ...)
    and metrics; ``table1``, ``pacs``, ``ls`` and ``baselines`` name the files shipped with
    calibrun (``papers/``)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PAPERS / f"{name_or_path}.csv"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in PAPERS.glob("*.csv")))
        raise UserError(f"No paper table {name_or_path!r}: give a CSV path or one of {shipped}.")
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"Cannot read the paper table {path}: {err}") from None


def with_paper(summary: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    join = [c for c in paper.columns if c in summary.columns]
    if not join:
        raise UserError(f"The paper table shares no column with the runs (its columns: {list(paper.columns)}).")
    values = paper.rename(columns={c: f"paper_{c}" for c in paper.columns if c not in join})
    summary = summary.copy()
    for c in join:
        # Config values come back from YAML as numbers or strings; compare as text.
        summary[c], values[c] = summary[c].astype(str), values[c].astype(str)
    return summary.merge(values, on=join, how="left")


def pivot_markdown(summary: pd.DataFrame, keys: list[str], pivot: str, metric: str,
                   paper: pd.DataFrame | None) -> str:
    """``metric`` with one column per value of ``pivot`` (the held-out domain, say) and
    their average, in the layout of the papers' tables; the paper's rows underneath."""
    rows = [k for k in keys if k != pivot] + ["calibrator"]
    cells = summary.assign(cell=[_mean_std(m, s, n) for m, s, n in
                                 zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n"])])
    # Keys a loss does not have (λ for ce) are NaN; pivoting would drop those rows.
    cells[rows] = cells[rows].astype(object).where(cells[rows].notna(), "–")
    # Rows in the order the runs give them (none first, as in metrics.md), not sorted.
    order = list(dict.fromkeys(cells[rows].itertuples(index=False, name=None)))
    order = [o[0] for o in order] if len(rows) == 1 else order
    table = cells.pivot_table(index=rows, columns=pivot, values="cell", aggfunc="first").reindex(order)
    # Runs behind each cell (seeds); a row's cells can differ where a run is missing.
    counts = cells.pivot_table(index=rows, values="n", aggfunc=["min", "max"]).reindex(order)
    table.insert(0, "n", [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in counts.to_numpy()])
    table["avg"] = cells.pivot_table(index=rows, columns=pivot, values=f"{metric}_mean").mean(axis=1).map(
        lambda v: "" if pd.isna(v) else f"{v:.4f}")
    table.index = [", ".join(str(as_written(v)) for v in (i if isinstance(i, tuple) else (i,))) for i in table.index]
    if paper is not None and metric in paper and pivot in paper:
        by = [k for k in rows if k in paper.columns]
        published = paper.pivot_table(index=by, columns=pivot, values=metric)
        published["avg"] = published.mean(axis=1)
        published = published.map("{:.4f}".format)
        published.insert(0, "n", "")
        published.index = [f"paper: {', '.join(map(str, i if isinstance(i, tuple) else (i,)))}"
                           for i in published.index]
        table = pd.concat([table, published])
    table.index.name = ", ".join(rows)
    # disable_numparse: keep every cell as formatted (0.1650, not 0.165).
    return f"### {metric}\n\n" + table.reset_index().to_markdown(index=False, disable_numparse=True)


def _read_bins(path: Path) -> pd.DataFrame:
    """A run's reliability bins; an unreadable file costs that run's bins, with a warning."""
    try:
        return read_run_table(path, ("calibrator", "bin", "lo", "hi", "count", "conf", "acc"))
    except BrokenFile as err:
        log.warning("Leaving out of the reliability grid: %s", err)
        return pd.DataFrame(columns=["calibrator", "bin", "lo", "hi", "count", "conf", "acc"])


def group_label(keys: list[str], values: tuple, paper: pd.DataFrame | None, shown: list[str] | None = None) -> str:
    """A group's name: the paper's row name (``label`` in its CSV) when exactly one row
    matches the group, else ``key=value`` for the keys the group has (of ``shown``, if given)."""
    pairs = {k: v for k, v in zip(keys, values) if not pd.isna(v)}
    if paper is not None and "label" in paper:
        common = [c for c in paper.columns if c in keys]
        match = paper[np.logical_and.reduce([paper[c].astype(str) == str(pairs.get(c)) for c in common])] \
            if common else paper.iloc[0:0]
        if len(match) == 1:
            return str(match["label"].iloc[0])
    return ", ".join(f"{k}={as_written(v)}" for k, v in pairs.items() if shown is None or k in shown)


def telling_keys(keys: list[str], values: list[tuple]) -> list[str]:
    """The keys that tell the groups apart by their values. A key that only some groups
    have, all with one value (a trained model's width beside logits made elsewhere), is
    left out of their names, unless the names would then no longer differ."""
    if len(values) < 2:
        return keys  # one group: its name is its setting
    telling = [k for j, k in enumerate(keys) if len({str(v[j]) for v in values if not pd.isna(v[j])}) > 1]

    def named(keep: list[str]) -> set[tuple]:
        return {tuple(str(v[j]) for j, k in enumerate(keys) if k in keep) for v in values}
    return telling if len(named(telling)) == len(named(keys)) else keys


def count_of(n: int, noun: str) -> str:
    """``1 run``, ``3 runs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def as_written(value: object) -> object:
    """A config value as the user wrote it: a column with gaps holds its integers as
    floats (depth 8.0), which print as 8."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def reliability_panels(metrics: pd.DataFrame, keys: list[str], calibrator: str,
                       paper: pd.DataFrame | None = None) -> list[tuple[str, pd.DataFrame, float, float]]:
    """One panel per group: the bins of its runs pooled over seeds (counts add up)."""
    panels = []
    chosen = metrics[metrics["calibrator"] == calibrator]
    groups = list(chosen.groupby(keys, dropna=False, sort=False)) if keys else [((), chosen)]
    values = [group if isinstance(group, tuple) else (group,) for group, _ in groups]
    for title, (_, rows) in zip(distinct_labels(keys, values, paper), groups):
        bins = pd.concat([_read_bins(Path(r) / BINS) for r in rows["run"]])
        pooled, _, _ = pool_bins(bins[bins["calibrator"] == calibrator])
        title = "\n".join(textwrap.wrap(title or calibrator, 45))
        panels.append((title, pooled, rows["ece"].mean(), rows["mce"].mean()))
    return panels


def distinct_labels(keys: list[str], values: list[tuple], paper: pd.DataFrame | None) -> list[str]:
    """:func:`group_label` of each group; groups that share a paper row's name (two λ
    readings of capped CE + gap) get the settings that tell them apart after it."""
    shown = telling_keys(keys, values)
    labels = [group_label(keys, v, paper, shown) for v in values]
    for label in {x for x in labels if labels.count(x) > 1}:
        same = [i for i, x in enumerate(labels) if x == label]
        differ = [j for j, _ in enumerate(keys) if len({str(values[i][j]) for i in same}) > 1]
        for i in same:
            extra = ", ".join(f"{keys[j]}={as_written(values[i][j])}" for j in differ if not pd.isna(values[i][j]))
            labels[i] = f"{label}: {extra}" if extra else label
    return labels


def _as_tuple(group: object) -> tuple:
    """A pandas group key as a tuple (one key gives a scalar in some versions)."""
    return group if isinstance(group, tuple) else (group,)


def curve_label(keys: list[str], group: object, shown: list[str]) -> str:
    """A curve's legend entry: ``key=value`` for the group's ``shown`` settings (as
    :func:`group_label`), then its calibrator, the last of ``group``'s values."""
    *values, calibrator = _as_tuple(group)
    return ", ".join(part for part in (group_label(keys, tuple(values), None, shown), str(calibrator)) if part)


def lam_curves(summary: pd.DataFrame, keys: list[str], metric: str) -> list[Curve]:
    """``metric`` (mean ± std over seeds) against λ, one curve per group of the other keys
    and calibrator, with λ ascending."""
    lam = next(k for k in keys if k.endswith(".lam"))
    others = [k for k in keys if k != lam]
    curves = []
    groups = list(summary.groupby([*others, "calibrator"], dropna=False, sort=False))
    shown = telling_keys(others, [_as_tuple(group)[:-1] for group, _ in groups])
    for label, rows in groups:
        rows = rows.sort_values(lam, key=lambda values: values.astype(float))
        # One seed has no standard deviation: draw no error bar rather than drop the point.
        curves.append(Curve(label=curve_label(others, label, shown), x=rows[lam].astype(float).to_numpy(),
                            y=rows[f"{metric}_mean"].to_numpy(), yerr=rows[f"{metric}_std"].fillna(0).to_numpy()))
    return curves


def metric_vs_lam(summary: pd.DataFrame, keys: list[str], metric: str, path: Path) -> None:
    """``metric`` and the accuracy against λ (the ``*.lam`` key among ``keys``), side by
    side; nothing is written unless some curve has two λ values or more (Table 1's
    objectives differ in λ only because CE has none)."""
    lam = next(k for k in keys if k.endswith(".lam"))
    summary = summary[summary[lam].notna() & (summary[lam].astype(str) != "nan")]
    panels = {name: lam_curves(summary, keys, name) for name in (metric, "accuracy")}
    if not any(len(curve.x) >= 2 for curve in panels[metric]):
        return
    curves_against(panels, path, x_name="λ", xlabel=f"λ ({lam})")


def _check_metrics(names: list[str], option: str, params: list[str] | None = None) -> None:
    """Refuse names that are neither a metric nor one of ``params`` (the runs' fitted-parameter,
    selective-risk and conformal-set columns). With ``params=None`` (runs not read yet)
    dotted names and those of such columns pass for now."""
    choices = [*METRIC_NAMES, *(params or [])]
    later = [name for name in names if "." in name or name.startswith(DECISION_PREFIXES)]
    unknown = [name for name in names if name not in choices and (params is not None or name not in later)]
    if unknown:
        raise UserError(f"Unknown metric {', '.join(map(repr, unknown))} in {option}; "
                        f"choose from {', '.join(choices)}.")


def _check_options(available: list[str], keys: list[str], calibrators: list[str] | None, grid_calibrator: str,
                   pivot: str | None) -> None:
    """Options that name calibrators or keys the runs do not have are refused, listing what they have."""
    unknown = [c for c in calibrators or [] if c not in available]
    if unknown:
        raise UserError(f"--calibrators: no run has {', '.join(unknown)}; the runs have {', '.join(available)}.")
    if grid_calibrator not in available:
        raise UserError(f"--grid-calibrator {grid_calibrator}: no run has it; the runs have {', '.join(available)}.")
    if pivot is not None and pivot not in keys:
        raise UserError(f"--pivot {pivot}: not a config key that differs between the runs; "
                        f"those are: {', '.join(keys) or '(none: the runs differ only in seed)'}.")


def write_report(paths: list[Path], out: Path, metric: str = "ece", name: str = "report",
                 calibrators: list[str] | None = None, paper: str | None = None,
                 grid_calibrator: str = "none", grid_name: str = "reliability_grid.png",
                 table_metrics: list[str] | None = None, pivot: str | None = None,
                 caption: str | None = None, baseline: str | None = None,
                 table_keys: list[str] | None = None) -> pd.DataFrame:
    """Aggregate run folders into ``<name>.csv``/``.md`` (mean ± std over seeds with the
    t-interval of the mean), an ``ece_vs_lam.png`` when λ varies, and a grid of pooled
    reliability diagrams. ``caption`` goes under the title of ``<name>.md`` (the setting
    a reader must know). ``baseline`` (``key=value,...``) adds each group's paired
    difference to that group on the same test images (``<name>_differences.csv``).
    ``table_keys`` are the config-key columns of the markdown table (default: every key
    that differs); the CSV keeps them all."""
    shown = table_metrics or list(TABLE_METRICS)
    _check_metrics([metric], "--metric")
    _check_metrics(shown, "--table-metrics")
    metrics, runs, keys = collect(paths)
    if len(metrics):  # with no finished run, only the unfinished ones are listed
        _check_options(sorted(set(metrics["calibrator"])), keys, calibrators, grid_calibrator, pivot)
    if calibrators:
        metrics = metrics[metrics["calibrator"].isin(calibrators)]
    if len(metrics):  # with no finished run there is no table: list the failed runs instead
        _check_metrics(shown, "--table-metrics", [*decision_columns(metrics), *param_columns(metrics)])
    summary = aggregate(metrics, keys) if len(metrics) else pd.DataFrame()
    reference = load_paper(paper) if paper else None
    if reference is not None and len(summary):
        summary = with_paper(summary, reference)
    wanted = parse_baseline(baseline, keys) if baseline else None
    heading = [f"# {name}", "", *([caption, ""] if caption else []),
               f"{count_of(len(runs), 'run')} under {', '.join(map(str, paths))}; test split; mean ± std over seeds "
               f"[{LEVEL:.0%} t-interval of the mean].", ""]
    unfinished = runs[runs["state"] != "done"]
    out.mkdir(parents=True, exist_ok=True)
    columns = _table_keys(table_keys, keys, summary) if table_keys else keys
    body = report_body(runs, keys, summary, shown, pivot, reference, columns)
    if wanted is not None and len(metrics):
        body += _baseline_section(metrics, runs, keys, wanted, [m for m in shown if m in METRIC_NAMES],
                                  out / f"{name}_differences.csv")
    atomic_write_text(out / f"{name}.md", "\n".join(heading + body))
    full = pd.concat([summary, unfinished[["run", "state", "error", *[k for k in keys if k in unfinished]]]],
                     ignore_index=True) if len(unfinished) else summary
    atomic_write_text(out / f"{name}.csv", full.to_csv(index=False))
    if len(summary) and any(k.endswith(".lam") for k in keys):
        metric_vs_lam(summary, keys, metric, out / f"{metric}_vs_lam.png")
    if len(metrics) and grid_calibrator in set(metrics["calibrator"]):
        panels = reliability_panels(metrics, keys, grid_calibrator, reference)
        shows = "none (the uncalibrated model)" if grid_calibrator == "none" else grid_calibrator
        reliability_grid(panels, out / grid_name, ncols=min(len(panels), 4),
                         title=f"Test split, calibrator: {shows}; bins pooled over seeds")
    write_shift_report(runs, keys, out, name, calibrators)
    write_ood_report(runs, keys, out, name, calibrators)
    return summary


def _baseline_section(metrics: pd.DataFrame, runs: pd.DataFrame, keys: list[str], baseline: dict[str, str],
                      shown: list[str], path: Path) -> list[str]:
    """The paired comparison to ``baseline``'s runs, written to ``path`` and as markdown lines."""
    # The runs' own bins (the most common setting), conf/config.yaml's where a run lacks it.
    bins = runs["metrics.n_bins"].dropna() if "metrics.n_bins" in runs else pd.Series(dtype=float)
    n_bins = int(bins.mode().iloc[0]) if len(bins) else DEFAULT_BINS
    settings = bootstrap.Settings(level=LEVEL)
    table = compare_to_baseline(metrics, keys, baseline, shown, n_bins, settings)
    atomic_write_text(path, table.to_csv(index=False))
    return comparison_markdown(table, keys, baseline, settings)


def _table_keys(wanted: list[str], keys: list[str], summary: pd.DataFrame) -> list[str]:
    """``wanted`` as the table's key columns, if they are keys that differ and still tell
    every row apart (else a row's numbers could be read as another's)."""
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        raise UserError(f"--keys: {', '.join(unknown)} is not a config key that differs between the runs; "
                        f"those are: {', '.join(keys) or '(none)'}.")
    shown = summary[[*wanted, "calibrator"]].astype(str) if len(summary) else pd.DataFrame()
    if len(shown) and shown.duplicated().any():
        clashing = summary[shown.duplicated(keep=False)].astype(str).groupby([*wanted, "calibrator"])
        hidden = [k for k in keys if k not in wanted and (clashing[k].nunique() > 1).any()]
        raise UserError(f"--keys {','.join(wanted)}: rows that differ in {', '.join(hidden)} would look the same; "
                        "add the keys that tell them apart.")
    return wanted


def report_body(runs: pd.DataFrame, keys: list[str], summary: pd.DataFrame, shown: list[str], pivot: str | None,
                reference: pd.DataFrame | None, columns: list[str] | None = None) -> list[str]:
    """The lines of a report under its heading: the settings every run shares, the table
    (one per metric with ``pivot`` across the columns; ``columns``, default ``keys``, the
    config keys shown), and the runs not finished."""
    lines = []
    done = runs[runs["state"] == "done"] if (runs["state"] == "done").any() else runs
    # Named only when every run has it with one value (logits made elsewhere have no data).
    constant = {k: done[k].iloc[0] for k in SHARED_SETTINGS if k in done and k not in keys
                and done[k].notna().all() and done[k].astype(str).nunique() == 1}
    if constant:
        lines += ["Same for all runs: " + ", ".join(f"{k}={v}" for k, v in constant.items()), ""]
    if len(summary) and pivot in keys:
        lines += [f"{pivot} across the columns; avg is the mean of the column means.", ""]
        lines += [block for metric in shown for block in (pivot_markdown(summary, keys, pivot, metric, reference), "")]
    elif len(summary):
        lines += [markdown(summary, columns or keys, shown, reference), ""]
    lines += collapsed_section(summary)
    unfinished = runs[runs["state"] != "done"]
    if len(unfinished):
        lines += [f"## Runs not finished ({len(unfinished)})", "",
                  unfinished[["run", "state", "error"]].fillna("").to_markdown(index=False), ""]
    return lines


def collapsed_section(summary: pd.DataFrame) -> list[str]:
    """A warning under the table when some runs' accuracy collapsed (metrics.collapse_margin):
    their rows average models that learnt next to nothing and must not be read as results."""
    if "collapsed" not in summary or not summary["collapsed"].any():
        return []
    return ["## Collapsed runs", "",
            f"{int(summary['collapsed'].sum())} row(s) of runs whose test accuracy fell below chance plus "
            "metrics.collapse_margin of the way to 1 (column collapsed: how many of the row's n runs). "
            "Those models learnt next to nothing: their calibration numbers are not results.", ""]


# --------------------------------------------------------------------------- shift and OOD


def collect_part(runs: pd.DataFrame, keys: list[str], part: str, calibrators: list[str] | None) -> pd.DataFrame:
    """The rows of every finished run's ``<part>/metrics.csv`` (``shift`` or ``ood``,
    written by ``calibrun.robustness``), with the run, its seed and its group keys."""
    frames = []
    for _, run in runs[runs["state"] == "done"].iterrows():
        path = Path(str(run["run"])) / part / METRICS
        if path.is_file():
            try:
                rows = read_run_table(path, ("calibrator",))
            except BrokenFile as err:
                log.warning("Leaving out of the %s report: %s", part, err)
                continue
            frames.append(rows.assign(run=run["run"], seed=run["seed"], **{k: run.get(k) for k in keys}))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows[rows["calibrator"].isin(calibrators)] if calibrators and len(rows) else rows


def shift_summary(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group, calibrator and severity: each run's mean over its corruptions, then
    mean ± std over the runs (seeds); ``n`` counts runs."""
    grouped = with_every_metric(rows).groupby(["run", *keys, "calibrator", "severity"], dropna=False, sort=False)
    per_run = grouped[list(METRIC_NAMES)]
    return aggregate(per_run.mean().reset_index(), [*keys, "severity"])


def severity_curves(summary: pd.DataFrame, keys: list[str], metric: str) -> list[Curve]:
    """``metric`` (mean ± std over seeds) against severity, one curve per group and calibrator."""
    curves = []
    groups = list(summary.groupby([*keys, "calibrator"], dropna=False, sort=False))
    shown = telling_keys(keys, [_as_tuple(group)[:-1] for group, _ in groups])
    for label, rows in groups:
        rows = rows.sort_values("severity")
        curves.append(Curve(label=curve_label(keys, label, shown), x=rows["severity"].astype(float).to_numpy(),
                            y=rows[f"{metric}_mean"].to_numpy(), yerr=rows[f"{metric}_std"].fillna(0).to_numpy()))
    return curves


def write_shift_report(runs: pd.DataFrame, keys: list[str], out: Path, name: str,
                       calibrators: list[str] | None) -> None:
    """``<name>_shift.md``/``.csv`` (ECE and accuracy per severity, mean over the
    corruptions, mean ± std over seeds) and ``<name>_shift_ece.png``, if any run has them."""
    rows = collect_part(runs, keys, "shift", calibrators)
    if not len(rows):
        return
    summary = shift_summary(rows, keys)
    corruptions = ", ".join(sorted(rows["corruption"].unique()))
    lines = [f"# {name}: corrupted test sets", "",
             f"{count_of(rows['run'].nunique(), 'run')}; each cell is the mean over the corruptions ({corruptions}) "
             "of each run, "
             "then mean ± std over seeds (n runs). Calibrators were fitted on each run's clean validation split.", ""]
    columns = summary.assign(severity=[f"severity {int(s)}" for s in summary["severity"]])
    lines += [block for metric in ("ece", "accuracy") for block in
              (pivot_markdown(columns, [*keys, "severity"], "severity", metric, None), "")]
    atomic_write_text(out / f"{name}_shift.md", "\n".join(lines))
    atomic_write_text(out / f"{name}_shift.csv", summary.to_csv(index=False))
    panels = {metric: severity_curves(summary, keys, metric) for metric in ("ece", "accuracy")}
    curves_against(panels, out / f"{name}_shift_ece.png", x_name="severity", xlabel="corruption severity",
                   xscale="linear")


def write_ood_report(runs: pd.DataFrame, keys: list[str], out: Path, name: str,
                     calibrators: list[str] | None) -> None:
    """``<name>_ood.md``/``.csv``: detection metrics per group, OOD set, score and
    calibrator, mean ± std over seeds, if any run has them."""
    rows = collect_part(runs, keys, "ood", calibrators)
    if not len(rows):
        return
    groups = [*keys, "dataset", "score", "calibrator"]
    grouped = rows.groupby(groups, dropna=False, sort=False)
    summary = grouped[list(DETECTION_METRICS)].agg(["mean", "std"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    summary = summary.reset_index()
    shown = summary[groups + ["n"]].astype(object).where(summary[groups + ["n"]].notna(), "–")
    for metric in DETECTION_METRICS:
        shown[metric] = [_mean_std(m, s, n) for m, s, n in
                         zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["n"])]
    lines = [f"# {name}: out-of-distribution detection", "",
             "In-distribution: each run's test split (the positive class); scores: msp = max probability, "
             "entropy = negative predictive entropy; fpr95 = FPR at 95% TPR. Mean ± std over seeds (n runs).", "",
             shown.to_markdown(index=False), ""]
    atomic_write_text(out / f"{name}_ood.md", "\n".join(lines))
    atomic_write_text(out / f"{name}_ood.csv", summary.to_csv(index=False))
