"""Per-run evaluation from saved logits (docs/design.md §7), and ``calibrun-calibrate``'s refit.

``calibrate_and_report`` is the one place where calibrators, metrics and plots meet: it
reads ``logits/{val,test}.npz``, fits every calibrator on ``val``, evaluates ``none``
and each calibrator on both splits, and writes ``metrics.csv``, ``metrics.md``,
``bins.csv``, ``calibrators.json`` (the fitted parameters) and ``figures/``. It needs
no model and no data. Training calls it at the end of a run; :func:`recalibrate` calls
it again on a finished run, starting from the run's own calibrator settings, and
records what it did in the run folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

import numpy as np
import pandas as pd
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from calibrun import UserError, bootstrap, conformal, selective
from calibrun._io import atomic_write_text
from calibrun.calibrators import Calibrator, Uncalibrated
from calibrun.config import build_component, first_line, validate
from calibrun.logits import load_logits, save_logits
from calibrun.metrics import (DEFAULT_COLLAPSE_MARGIN, METRIC_NAMES, Weighted, bin_stats, collapse_threshold, scores,
                              validated)
from calibrun.metrics import metric as metric_of
from calibrun.plots import confidence_histogram, reliability_with_histogram, risk_coverage
from calibrun.bootstrap import interval_names
from calibrun.runfolder import (BINS, CALIBRATOR_PARAMS, CONFIG, CONFORMAL, DIFFERENCES, EXTERNAL_SOURCE, METRICS,
                                RISK_COVERAGE, group_choices, logits_file, mark_done, read_run_table,
                                require_finished_run, run_config, write_status)

# collapsed: the row's accuracy is below metrics.collapse_margin's threshold (metrics.collapse_threshold);
# <metric>_lo and <metric>_hi: the metric's bootstrap interval (calibrun.bootstrap), empty with intervals off.
METRIC_COLUMNS = ["split", "calibrator", *METRIC_NAMES, "n", "collapsed", *interval_names()]
BIN_COLUMNS = ["calibrator", "bin", "lo", "hi", "count", "conf", "acc", "acc_lo", "acc_hi"]
CURVE_COLUMNS = ["calibrator", "coverage", "risk"]
# metrics.coverages' default, for runs made before the key existed.
DEFAULT_COVERAGES = (0.8, 0.9, 0.95)
DIFFERENCE_COLUMNS = ["split", "calibrator", "baseline", "metric", "difference", "lo", "hi", "better", "worse"]
# The metrics whose significant improvement over none metrics.md marks with MARK.
MARKED_METRICS = ("ece", "nll")
MARK = "*"
# One JSON object per calibrun-calibrate call, appended in the run folder.
CALIBRATION_LOG = "calibrations.jsonl"
log = logging.getLogger(__name__)
OVERRIDE_HELP = "calibrator=[name,...], calibrator.<name>.<key>=value and metrics.<key>=value"


# --------------------------------------------------------------------------- tables and figures


class MetricSettings(TypedDict):
    """The keyword arguments of :func:`calibrate_and_report` that a run's ``metrics.*`` set."""

    n_bins: int
    collapse_margin: float
    intervals: bootstrap.Settings | None
    smooth_curve: bool
    coverages: tuple[float, ...]
    conformal_sets: conformal.Settings | None


_T = TypeVar("_T")


def metric_settings(cfg: DictConfig) -> MetricSettings:
    """The ``metrics.*`` settings :func:`calibrate_and_report` takes, from a run's config (a
    run made before a setting existed gets its default)."""
    def setting(key: str, default: _T) -> _T:
        # The config schema (calibrun.config) gives each metrics key its default's type.
        return cast(_T, OmegaConf.select(cfg, f"metrics.{key}", default=default))

    defaults = bootstrap.Settings()
    intervals = bootstrap.Settings(setting("resamples", defaults.resamples), setting("level", defaults.level),
                                   setting("bootstrap_seed", defaults.seed), setting("interval", defaults.interval))
    sets = conformal.Settings()
    conformal_sets = conformal.Settings(
        setting("conformal_alpha", sets.alpha), tuple(setting("conformal_methods", sets.methods)),
        setting("conformal_share", sets.share), setting("conformal_seed", sets.seed),
        setting("conformal_raps_lambda", sets.raps_lambda), setting("conformal_raps_k_reg", sets.raps_k_reg))
    return {"n_bins": cfg.metrics.n_bins, "collapse_margin": setting("collapse_margin", DEFAULT_COLLAPSE_MARGIN),
            "intervals": intervals if setting("intervals", True) else None,
            "smooth_curve": setting("smooth_curve", False),
            "coverages": tuple(setting("coverages", DEFAULT_COVERAGES)),
            "conformal_sets": conformal_sets if setting("conformal", False) else None}


Logits = tuple[np.ndarray, np.ndarray]


@dataclass
class Decisions:
    """What each row reports beyond the metrics: the selective risk at ``coverages`` and,
    with ``sets``, the coverage and mean size of the conformal sets at each calibrator's
    ``quantiles`` (method → q̂), the same on the test split and on every shifted one."""

    coverages: tuple[float, ...] = DEFAULT_COVERAGES
    sets: conformal.Settings | None = None
    quantiles: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of_run(cls, run_dir: Path, cfg: DictConfig) -> Decisions:
        """A finished run's: its ``metrics.coverages`` and the sets of its ``conformal.json``."""
        coverages = tuple(OmegaConf.select(cfg, "metrics.coverages", default=DEFAULT_COVERAGES))
        path = run_dir / CONFORMAL
        if not path.is_file():
            return cls(coverages)
        try:
            record = json.loads(path.read_text())
            settings = conformal.Settings(**{key: record[key] for key in asdict(conformal.Settings())})
            return cls(coverages, replace(settings, methods=tuple(settings.methods)), record["quantiles"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"Cannot read {path} ({err}); refit the run with calibrun-calibrate {run_dir}.") from None

    def columns(self, intervals: bool = False) -> list[str]:
        """The selective risks' columns (with ``intervals`` each followed by its ``_lo`` and
        ``_hi``), then each method's set coverage and size."""
        risks = [selective.risk_column(c) for c in self.coverages]
        bounds = [f"{name}_{end}" for name in risks for end in ("lo", "hi")] if intervals else []
        sets = [f"set_{what}_{method}" for method in self.sets.methods for what in ("coverage", "size")
                ] if self.sets else []
        return [*risks, *bounds, *sets]

    def risk_intervals(self, probs: np.ndarray, labels: np.ndarray, columns: dict[str, float],
                       settings: bootstrap.Settings) -> dict[str, float]:
        """Each selective risk's bootstrap interval, on the resamples of the metrics' intervals;
        ``columns``: :meth:`row`'s values, the risks on the sample itself."""
        p, y = validated(probs, labels)
        shared: dict = {}
        values = np.concatenate([selective.risks_at_weighted(Weighted(p, y, 1, w, shared), list(self.coverages))
                                 for w in bootstrap.resample_weights(len(y), settings)], axis=1)
        point = np.array([columns[selective.risk_column(c)] for c in self.coverages])
        lo, hi = bootstrap.interval(values, point, settings)
        return {f"{selective.risk_column(c)}_{end}": float(np.clip(value, 0.0, 1.0))
                for c, a, b in zip(self.coverages, lo, hi) for end, value in (("lo", a), ("hi", b))}

    def row(self, name: str, probs: np.ndarray, labels: np.ndarray, with_sets: bool = True) -> dict[str, float]:
        """The columns of calibrator ``name`` on validated ``probs`` and ``labels``."""
        columns = selective.risk_columns(probs, labels, list(self.coverages))
        if with_sets and name in self.quantiles:
            assert self.sets is not None  # quantiles come only with the sets' settings
            columns.update(conformal.set_columns(probs, labels, self.quantiles[name], self.sets))
        return columns


@dataclass
class _Evaluation:
    """What :func:`calibrate_and_report` evaluates each calibrator with, and what it collects:
    metric rows, test bins, fitted parameters, risk–coverage curves and conformal quantiles."""

    splits: dict[str, Logits]
    held: Logits | None
    n_bins: int
    threshold: float
    intervals: bootstrap.Settings | None
    smooth_curve: bool
    decisions: Decisions
    rows: list = field(default_factory=list)
    bins: list = field(default_factory=list)
    params: dict = field(default_factory=dict)
    curves: list = field(default_factory=list)
    resampled: dict = field(default_factory=lambda: {"val": {}, "test": {}})

    def calibrator(self, run_dir: Path, name: str, calibrator: Calibrator) -> None:
        """Fit ``calibrator`` on the validation logits it may use and evaluate it on both splits."""
        reason = calibrator.too_costly(*self.splits["val"][0].shape)
        if reason is not None:
            log.warning("%s: %s", name, reason)
            return
        started = time.perf_counter()
        self.params[name] = calibrator.fit(*self.splits["val"]).params()
        log.info("Fitted %s on %d validation logits in %.1f s", name, len(self.splits["val"][1]),
                 time.perf_counter() - started)
        if self.held is not None:
            assert self.decisions.sets is not None  # images are held out only for the sets
            self.decisions.quantiles[name] = conformal.quantiles(calibrator.predict_proba(self.held[0]), self.held[1],
                                                                 self.decisions.sets)
        # The level of the bins' Wilson intervals and the smooth curve's band, intervals off or on.
        band = self.intervals or bootstrap.Settings()
        for split, (z, y) in self.splits.items():
            probs = calibrator.predict_proba(z)
            scored = scores(probs, y, self.n_bins)
            decided = self.decisions.row(name, probs, y, with_sets=split == "test")
            self.rows.append({"split": split, "calibrator": name, **scored,
                              "collapsed": scored["accuracy"] < self.threshold,
                              **_intervals(self.resampled[split], name, probs, y, scored, self.n_bins, self.intervals),
                              **decided,
                              **(self.decisions.risk_intervals(probs, y, decided, self.intervals)
                                 if self.intervals else {})})
            if split == "test":
                curve = bootstrap.smooth_curve(probs, y, band) if self.smooth_curve else None
                self.bins.append(_test_bins_and_figures(run_dir / "figures", name, probs, y, scored, self.n_bins,
                                                        band.level, curve))
                self.curves.append(selective.curve_points(probs, y).assign(calibrator=name))


def _hold_out(val: Logits, settings: conformal.Settings | None) -> tuple[Logits, Logits | None]:
    """(the validation logits the calibrators are fitted on, those held out for the
    conformal quantile or None): the whole split without conformal sets."""
    if settings is None:
        return val, None
    fit, held = conformal.split_validation(len(val[1]), settings)
    return (val[0][fit], val[1][fit]), (val[0][held], val[1][held])


def calibrate_and_report(run_dir: Path, calibrators: dict[str, Calibrator], n_bins: int = 15,
                         collapse_margin: float = DEFAULT_COLLAPSE_MARGIN,
                         intervals: bootstrap.Settings | None = bootstrap.Settings(),
                         smooth_curve: bool = False, coverages: tuple[float, ...] = DEFAULT_COVERAGES,
                         conformal_sets: conformal.Settings | None = None) -> pd.DataFrame:
    """Fit each calibrator on the val logits, evaluate on val and test, write the tables
    and the fitted parameters (``calibrators.json``).

    ``none`` (the uncalibrated softmax) is always reported first. Val rows of fitted
    calibrators are in-sample; the test rows are the ones to compare. With ``intervals``
    every metric gets its bootstrap interval and every calibrator its paired difference to
    ``none`` on the same resamples (``differences.csv``). Rows, bins, curves and parameters
    of calibrators already in the run folder but not given here are kept, so a refit of a
    subset (``calibrun-calibrate``) does not erase the others. A row whose accuracy is
    below :func:`~calibrun.metrics.collapse_threshold` is marked ``collapsed`` and
    metrics.md says so above the table. ``smooth_curve`` draws the smooth reliability
    curve with its bootstrap band on each test diagram. Each row has the selective risk
    at ``coverages``; with ``conformal_sets`` the calibrators are fitted on the validation
    images it does not hold out, and each test row has the coverage and mean size of the
    conformal sets whose quantile the held-out images give (``conformal.json``). Returns the table.
    """
    splits = {split: load_logits(logits_file(run_dir, split)) for split in ("val", "test")}
    splits["val"], held = _hold_out(splits["val"], conformal_sets)
    threshold = collapse_threshold(splits["test"][0].shape[1], collapse_margin)
    run = _Evaluation(splits, held, n_bins, threshold, intervals, smooth_curve,
                      Decisions(tuple(coverages), conformal_sets))
    for name, calibrator in {"none": Uncalibrated(), **calibrators}.items():
        run.calibrator(run_dir, name, calibrator)
    differences = [{"split": split, **row} for split, by_name in run.resampled.items()
                   for row in _against_none(by_name, intervals)] if intervals is not None else []
    columns = [*METRIC_COLUMNS, *run.decisions.columns(intervals is not None)]
    table = _keep_others(run_dir / METRICS, pd.DataFrame(run.rows, columns=columns))
    paired = _keep_others(run_dir / DIFFERENCES, pd.DataFrame(differences, columns=DIFFERENCE_COLUMNS))
    sets = _write_conformal(run_dir / CONFORMAL, run, held)
    write_run_tables(run_dir, table, _keep_others(run_dir / BINS, pd.concat(run.bins)[BIN_COLUMNS]), n_bins,
                     (threshold, collapse_margin), paired, intervals, sets)
    _write_curves(run_dir, _keep_others(run_dir / RISK_COVERAGE, pd.concat(run.curves)[CURVE_COLUMNS]), table)
    write_calibrator_params(run_dir / CALIBRATOR_PARAMS, run.params)
    return table


def _write_conformal(path: Path, run: _Evaluation, held: Logits | None) -> dict | None:
    """``conformal.json``: the sets' settings, the split sizes and each calibrator's
    quantile (those of calibrators not refitted kept); removed when the sets are off."""
    sets, quantiles = run.decisions.sets, run.decisions.quantiles
    if sets is None:
        path.unlink(missing_ok=True)
        return None
    assert held is not None  # the sets' quantiles come from the held-out images
    old = json.loads(path.read_text()).get("quantiles", {}) if path.is_file() else {}
    record = {**asdict(sets), "n_calibrators_fit": len(run.splits["val"][1]), "n_held_out": len(held[1]),
              "quantiles": {**quantiles, **{k: v for k, v in old.items() if k not in quantiles}}}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record


def _write_curves(run_dir: Path, curves: pd.DataFrame, table: pd.DataFrame) -> None:
    """``risk_coverage.csv`` and ``figures/risk_coverage.png``, one curve per calibrator on test."""
    atomic_write_text(run_dir / RISK_COVERAGE, curves.to_csv(index=False))
    test = table[table["split"] == "test"].set_index("calibrator")
    title = f"Risk–coverage on the test split ({int(test['n'].iloc[0])} images)"
    risk_coverage(curves, run_dir / "figures" / "risk_coverage.png", title=title,
                  aurc=test["aurc"].to_dict() if "aurc" in test else None)


def _against_none(by_name: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                  settings: bootstrap.Settings) -> list[dict[str, object]]:
    """Each calibrator's paired differences to none from :func:`_intervals`' values."""
    point, population, values = ({name: kept[i] for name, kept in by_name.items()} for i in range(3))
    return bootstrap.paired_differences(point, values, "none", settings, population)


def _intervals(resampled: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], name: str, probs: np.ndarray,
               labels: np.ndarray, scored: dict[str, float], n_bins: int,
               settings: bootstrap.Settings | None) -> dict[str, float]:
    """The interval columns of one row (none without ``settings``); keeps the point,
    population and resampled values in ``resampled[name]`` for the paired differences."""
    if settings is None:
        return {}
    started = time.perf_counter()
    values = bootstrap.resampled(probs, labels, n_bins, settings)
    point = np.array([scored[name] for name in METRIC_NAMES])
    population = bootstrap.population_values(probs, labels, n_bins, point)
    resampled[name] = (point, population, values)
    log.info("Bootstrap intervals of %s (%d resamples of %d images) in %.1f s", name, settings.resamples,
             len(labels), time.perf_counter() - started)
    return bootstrap.interval_columns(values, point, settings, population)


def _test_bins_and_figures(figures: Path, name: str, probs: np.ndarray, labels: np.ndarray,
                           scores: dict[str, float], n_bins: int, level: float,
                           curve: pd.DataFrame | None = None) -> pd.DataFrame:
    """The test-set reliability bins of calibrator ``name``, with the Wilson interval of
    each bin's accuracy at ``level``; draws its reliability diagram (with the smooth
    ``curve`` if given; for ``none`` also the confidence histogram) on the way."""
    stats = bin_stats(probs, labels, n_bins, level)
    label = "none (uncalibrated)" if name == "none" else name
    reliability_with_histogram(stats, figures / f"reliability_{name}.png", title=f"{label}, test split",
                               ece=scores["ece"], mce=scores["mce"], curve=curve)
    if name == "none":
        conf = probs.max(axis=1)
        confidence_histogram(conf, figures / "confidence_hist.png", accuracy=scores["accuracy"],
                             mean_confidence=float(conf.mean()), n_bins=n_bins, title=f"{label}, test split")
    return stats.assign(calibrator=name)


def _read_run_table(path: Path) -> pd.DataFrame | None:
    """A run's ``metrics.csv`` or ``bins.csv``, None if it has none yet; a broken one stops
    the command, named in one line (delete it to write a new one)."""
    return read_run_table(path, ("calibrator",)) if path.exists() else None


def _keep_others(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` plus the rows of ``path`` whose calibrator ``new`` does not cover."""
    old = _read_run_table(path)
    kept = None if old is None else old[~old["calibrator"].isin(new["calibrator"])]
    if kept is None or not len(kept):
        # Nothing kept: no column of an earlier setting (conformal sets turned off) survives.
        return new.reset_index(drop=True)
    return pd.concat([new, kept], ignore_index=True)


def write_calibrator_params(path: Path, params: dict[str, dict]) -> None:
    """Write ``params`` (calibrator name -> fitted parameters) to ``path`` atomically,
    followed by the entries of calibrators already in ``path`` that ``params`` lacks."""
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"Cannot read {path}: {err}; delete it to write a new one.") from None
        if not isinstance(old, dict):
            raise UserError(f"{path} does not hold a JSON object; delete it to write a new one.")
    kept = {name: value for name, value in old.items() if name not in params}
    atomic_write_text(path, json.dumps({**params, **kept}, indent=2) + "\n")


def run_header(run_dir: Path, n_bins: int) -> list[str]:
    """Markdown lines naming what produced a run's table: data, model, loss, schedule,
    subsets, seed, bins; read from the run's ``config.yaml`` (nothing if there is none)."""
    if (run_dir / EXTERNAL_SOURCE).is_file():
        return _external_header(run_dir, n_bins)
    path = run_dir / CONFIG
    try:
        cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        cfg = None
    if not isinstance(cfg, dict):
        return []
    trainer = cfg.get("trainer") or {}
    described = describe_components(cfg, group_choices(run_dir))
    return [
        f"# {run_dir.name}: test and validation metrics", "",
        f"- Data: {described['data']}",
        f"- Model: {described['model']}",
        f"- Loss: {described['loss']}",
        f"- Training: {trainer.get('epochs')} epochs, batch {trainer.get('batch_size')}, lr {trainer.get('lr')} "
        f"{trainer.get('schedule')}, seed {cfg.get('seed')}",
        f"- Metrics: {n_bins} equal-width bins; calibrators fitted on val, so their val rows are in-sample", "",
    ]


def describe_components(cfg: dict, chosen: dict) -> dict[str, str]:
    """``{"data": ..., "model": ..., "loss": ...}`` as a reader should see them: the config
    group option (the ``_target_``'s name without one) and the settings that make it what
    it is, e.g. ``resnet110 (depth=8, shortcut=A, width=16, zero_init_residual=True)``, so
    that a table or figure never names only the option a preset changed."""
    def name(node: object) -> str:
        return str(node.get("_target_", "?")).rsplit(".", 1)[-1] if isinstance(node, dict) else "?"

    def settings(node: object, skip: tuple[str, ...] = ()) -> str:
        pairs = [f"{k}={v}" for k, v in (node or {}).items() if not k.startswith("_") and k not in skip
                 and v is not None and not isinstance(v, (dict, list))] if isinstance(node, dict) else []
        return f" ({', '.join(pairs)})" if pairs else ""

    data = cfg.get("data") or {}
    subsets = [f"{k}={data[k]}" for k in ("train_subset", "test_subset") if data.get(k) is not None]
    return {
        "data": f"{chosen.get('data') or data.get('name') or name(data)}{', ' + ', '.join(subsets) if subsets else ''}",
        "model": f"{chosen.get('model') or name(cfg.get('model'))}{settings(cfg.get('model'), ('num_classes',))}",
        "loss": f"{chosen.get('loss') or name(cfg.get('loss'))}{settings(cfg.get('loss'))}",
    }


def _external_header(run_dir: Path, n_bins: int) -> list[str]:
    """:func:`run_header` for logits made outside calibrun: where they came from."""
    try:
        source = json.loads((run_dir / EXTERNAL_SOURCE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        source = {}
    if not isinstance(source, dict):
        source = {}
    return [
        f"# {run_dir.name}: test and validation metrics", "",
        f"- Model: {source.get('name', '?')}, logits made outside calibrun",
        f"- Validation logits: {source.get('val', '?')}",
        f"- Test logits: {source.get('test', '?')}",
        f"- Metrics: {n_bins} equal-width bins; calibrators fitted on val, so their val rows are in-sample", "",
    ]


def grouped_by_split(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a metrics table grouped by split, test first (what a reader compares),
    then val (in-sample for the calibrators), each in the table's calibrator order."""
    order = {"test": 0, "val": 1}
    return table.sort_values("split", key=lambda split: split.map(order).fillna(2), kind="stable")


def console_table(table: pd.DataFrame) -> str:
    """A metrics table as the console shows it: test rows first, four decimals (never
    1.466331e-08), the point values only (metrics.md has the intervals)."""
    shown = grouped_by_split(table).drop(columns=[c for c in interval_names() if c in table])
    return shown.to_string(index=False, float_format=lambda value: f"{value:.4f}")


def write_run_tables(run_dir: Path, table: pd.DataFrame, bins: pd.DataFrame, n_bins: int = 15,
                     collapse: tuple[float, float] | None = None, differences: pd.DataFrame | None = None,
                     intervals: bootstrap.Settings | None = None, sets: dict | None = None) -> None:
    """``metrics.csv``, ``metrics.md`` (with a header naming the run's settings, a warning
    when the model collapsed below ``collapse`` = (threshold, margin), each value with its
    interval and the significant improvements over none marked, then the selective risks
    and the conformal sets of ``sets`` (conformal.json's record)), ``bins.csv`` and
    ``differences.csv``, each written atomically."""
    differences = pd.DataFrame(columns=DIFFERENCE_COLUMNS) if differences is None else differences
    atomic_write_text(run_dir / METRICS, table.to_csv(index=False))
    lines = [*run_header(run_dir, n_bins), *collapse_warning(table, collapse), *improvement_lines(differences),
             markdown_table(table, differences), "", *legend(intervals), "", *decision_section(table, sets)]
    atomic_write_text(run_dir / "metrics.md", "\n".join(lines) + "\n")
    atomic_write_text(run_dir / BINS, bins.to_csv(index=False))
    atomic_write_text(run_dir / DIFFERENCES, differences.to_csv(index=False))


# How the columns of Decisions start: their names follow the run's coverages and scores.
DECISION_PREFIXES = ("risk_at_", "set_coverage_", "set_size_")


def decision_columns(table: pd.DataFrame) -> list[str]:
    """The selective-risk and conformal-set columns of a metrics table, in its order (not
    the risks' interval bounds)."""
    return [c for c in table.columns if c.startswith(DECISION_PREFIXES) and not c.endswith(("_lo", "_hi"))]


def decision_section(table: pd.DataFrame, sets: dict | None) -> list[str]:
    """metrics.md's second table: what the test split's confidences are worth for abstaining
    (AURC, E-AURC, AUGRC, the selective risks) and, with ``sets``, the conformal sets."""
    columns = ["aurc", "eaurc", "augrc", *decision_columns(table)]
    test = table[table["split"] == "test"]
    shown = test[["calibrator", *columns]].astype(object)
    for column in columns:
        lo, hi = (test.get(f"{column}_{end}", pd.Series(np.nan, index=test.index)) for end in ("lo", "hi"))
        shown[column] = [f"{v:.4f}" if pd.isna(a) or pd.isna(b) else f"{v:.4f} [{a:.4f}, {b:.4f}]"
                         for v, a, b in zip(test[column], lo, hi)]
    lines = ["## Selective prediction and conformal sets, test split", "",
             shown.to_markdown(index=False, disable_numparse=True), "",
             "risk_at_<c>: the error rate among the c% most confident test images, with the bootstrap interval of "
             "the metrics above (docs/guide/selective-conformal.md); AURC, E-AURC, AUGRC: lower "
             "is better."]
    if sets:
        lines.append(f"set_coverage_<score>: the share of test images whose conformal set holds the label, promised "
                     f"at least {1 - sets['alpha']:.2f} (metrics.conformal_alpha={sets['alpha']:g}) while test images "
                     f"are exchangeable with the validation ones; set_size_<score>: the mean number of labels per set. "
                     f"The quantile comes from {sets['n_held_out']} validation images held out "
                     f"(metrics.conformal_share={sets['share']:g}, metrics.conformal_seed={sets['seed']}); the "
                     f"calibrators were fitted on the other {sets['n_calibrators_fit']}, the val rows above are on "
                     "them. "
                     "Calibration draws of that size give a coverage between {:.3f} and {:.3f} in 95% of cases (Vovk "
                     "2012's Beta law), before the test images' own sampling.".format(
                         *conformal.coverage_spread(sets["n_held_out"], sets["alpha"])))
    return lines


def _marked(differences: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(split, calibrator, metric) of the significant improvements over none that metrics.md marks."""
    better = differences[differences["better"].astype(bool) & differences["metric"].isin(MARKED_METRICS)]
    return set(better[["split", "calibrator", "metric"]].itertuples(index=False, name=None))


def markdown_table(table: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The metrics table of metrics.md: ``value [lo, hi]`` where the row has an interval,
    :data:`MARK` after an ECE or NLL that improves significantly on none's."""
    marked = _marked(differences)
    ordered = grouped_by_split(table)
    shown = ordered[["split", "calibrator", *METRIC_NAMES, "n", "collapsed"]].astype(object)
    for metric in METRIC_NAMES:
        cells = []
        for _, row in ordered.iterrows():
            lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
            cell = f"{row[metric]:.4f}" if pd.isna(lo) or pd.isna(hi) else f"{row[metric]:.4f} [{lo:.4f}, {hi:.4f}]"
            cells.append(cell + (MARK if (row["split"], row["calibrator"], metric) in marked else ""))
        shown[metric] = cells
    return shown.to_markdown(index=False, disable_numparse=True)


def improvement_lines(differences: pd.DataFrame) -> list[str]:
    """One line per marked metric naming the calibrators that improve it significantly on
    the test split (none when the run has no paired differences)."""
    if not len(differences):
        return []
    lines = []
    for metric in MARKED_METRICS:
        test = differences[(differences["split"] == "test") & (differences["metric"] == metric)]
        better = test.loc[test["better"].astype(bool), "calibrator"].tolist()
        worse = test.loc[test["worse"].astype(bool), "calibrator"].tolist()
        lower = ", ".join(better) or "no calibrator"
        higher = f"; significantly higher with {', '.join(worse)}" if worse else ""
        lines.append(f"- Test {metric.upper()}: significantly lower than none's with {lower}{higher} (of {len(test)}).")
    return [*lines, ""]


def legend(intervals: bootstrap.Settings | None) -> list[str]:
    """What the columns and brackets of metrics.md mean."""
    how = ("Brackets: the bootstrap interval of the run's earlier settings" if intervals is None else
           f"Brackets: the {intervals.level:.0%} {intervals.interval} bootstrap interval over {intervals.resamples} "
           f"resamples of the evaluated images (metrics.interval, metrics.bootstrap_seed={intervals.seed})")
    columns = "; ".join(f"{name}: {metric_of(name).header}" for name in METRIC_NAMES)
    return [f"{how}; {MARK} after ECE or NLL: lower than none's on the same resamples, the interval of the "
            "difference below 0 (differences.csv has every metric's).", "", f"Columns: {columns}."]


def collapse_warning(table: pd.DataFrame, collapse: tuple[float, float] | None) -> list[str]:
    """Lines for metrics.md when the uncalibrated model's test accuracy is below
    ``collapse`` = (threshold, margin) (none otherwise): its calibration numbers describe a
    model that learnt next to nothing."""
    if collapse is None:
        return []
    collapsed = table["collapsed"].fillna(False).astype(bool)
    rows = table[(table["split"] == "test") & (table["calibrator"] == "none") & collapsed]
    if not len(rows):
        return []
    threshold, margin = collapse
    return [f"**Collapsed run: test accuracy {rows['accuracy'].iloc[0]:.4f} is below {threshold:.4f}, chance plus "
            f"metrics.collapse_margin={margin:g} of the way from chance to 1. This model learnt next to nothing; "
            "its calibration numbers are not a result.**", ""]


# --------------------------------------------------------------------------- calibrun-calibrate


def load_calibrators(run_dir: Path) -> dict[str, Calibrator]:
    """The calibrators of a finished run as it fitted them, from its ``calibrators.json``
    and ``config.yaml``: apply them to new logits without refitting.

    Example: ``load_calibrators(run)["temperature"].predict_proba(logits)``.
    """
    path = run_dir / CALIBRATOR_PARAMS
    try:
        params = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"Cannot read {path}: {err}") from None
    section = run_config(run_dir).get("calibrator") or {}
    missing = [name for name in params if name != "none" and name not in section]
    if missing:
        raise UserError(f"{run_dir / 'config.yaml'} has no calibrator.{missing[0]} for the entry in {path}.")
    fitted = OmegaConf.create({n: section[n] for n in params if n != "none"})
    built = {"none": Uncalibrated(), **build_calibrators(fitted)}
    try:
        return {name: built[name].load_params(values) for name, values in params.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} does not hold the parameters calibrun wrote ({err}).") from None


def build_calibrators(section: DictConfig) -> dict[str, Calibrator]:
    """One calibrator per entry of a validated ``calibrator`` config section."""
    built: dict[str, Calibrator] = {}
    for name, node in section.items():
        key = str(name)  # config keys are strings; omegaconf's stubs also allow bytes, ints and enums
        built[key] = build_component(node, f"calibrator.{key}")
    return built


def recalibrate(run_dir: Path, overrides: list[str], conf_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Refit the calibrators of a finished run from its saved logits (``calibrun-calibrate``).

    Starts from the run's own ``calibrator`` and ``metrics`` settings, applies
    ``overrides`` (see :func:`refit_config`), rewrites the tables and figures, brings the
    run's ``config.yaml`` in line with them and appends the refit to ``calibrations.jsonl``.
    Returns the table and the calibrators refitted.
    """
    require_finished_run(run_dir)
    run_cfg = run_config(run_dir)
    metrics = _read_run_table(run_dir / METRICS)
    in_table = [] if metrics is None else [c for c in metrics["calibrator"].unique() if c != "none"]
    cfg = refit_config(run_cfg, overrides, in_table, conf_dir)
    table = calibrate_and_report(run_dir, build_calibrators(cfg.calibrator), **metric_settings(cfg))
    _record_refit(run_dir, run_cfg, cfg, overrides)
    return table, list(cfg.calibrator)


def refit_config(run_cfg: DictConfig, overrides: list[str], in_table: list[str], conf_dir: Path) -> DictConfig:
    """The validated config a refit uses: the run's ``calibrator`` and ``metrics`` settings
    with ``overrides`` on top, the rest of it the default config (only these two sections
    matter to a refit, and the default stays valid while old runs' configs may not).

    ``calibrator=[a,b]`` picks the calibrators (default: the run's), each with the run's
    settings when it has them, else ``conf/calibrator/<name>.yaml``'s. A ``metrics.*``
    setting (bins, the bootstrap's) that differs from the run's also refits ``in_table``,
    the calibrators already in the table, so that no row keeps the old bins or resamples.
    """
    chosen, settings, metric_values = _parse_overrides(overrides)
    run_section = _as_dict(run_cfg.get("calibrator") or OmegaConf.create({}), resolve=True)
    base = _compose_all_calibrators(conf_dir)
    unknown_metric = [key for key in metric_values if key not in base.metrics]
    if unknown_metric:
        raise UserError(f"calibrun-calibrate cannot apply metrics.{unknown_metric[0]}: the metrics settings are "
                        f"{', '.join(f'metrics.{key}' for key in base.metrics)}.")
    # A run made before a setting existed used its default, conf/config.yaml's.
    run_metrics = {**_as_dict(base.metrics), **_as_dict(run_cfg.get("metrics") or OmegaConf.create({}), resolve=True)}
    names = list(run_section) if chosen is None else list(dict.fromkeys(chosen))
    if any(run_metrics.get(key) != value for key, value in metric_values.items()):
        names += [name for name in in_table if name not in names]
    unknown = [name for name in names if name not in run_section and name not in base.calibrator]
    if unknown:
        known = ", ".join(sorted({*run_section, *base.calibrator}))
        raise UserError(f"Unknown calibrator {', '.join(map(repr, unknown))} in calibrator=[...]; known: {known}.")
    section = OmegaConf.create({name: run_section[name] if name in run_section else base.calibrator[name]
                                for name in names})
    for key, value in settings.items():
        if key.split(".")[0] not in names:
            raise UserError(f"Override calibrator.{key}: {key.split('.')[0]!r} is not among the calibrators "
                            f"refitted ({', '.join(names) or 'none'}); add it to calibrator=[...].")
        OmegaConf.update(section, key, value, merge=True)
    raw = _as_dict(base)
    raw.update(calibrator=_as_dict(section), metrics={**run_metrics, **metric_values})
    return validate(OmegaConf.create(raw))


def _parse_overrides(overrides: list[str]) -> tuple[list[str] | None, dict[str, object], dict[str, object]]:
    """(the calibrators ``calibrator=[...]`` picks or None, the ``calibrator.<key>`` values
    keyed below ``calibrator``, the ``metrics.<key>`` values keyed below ``metrics``)."""
    parser = OverridesParser.create()
    chosen: list[str] | None = None
    settings: dict[str, object] = {}
    metric_values: dict[str, object] = {}
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as err:
            raise UserError(f"Cannot parse override {text!r}: {first_line(err)}") from None
        key = override.key_or_group
        if override.is_delete() or override.is_sweep_override() or override.package is not None:
            raise UserError(f"calibrun-calibrate cannot apply {text!r}: it takes plain {OVERRIDE_HELP}.")
        if key == "calibrator":
            value = override.value()
            chosen = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif key.startswith("calibrator."):
            settings[key.removeprefix("calibrator.")] = override.value()
        elif key.startswith("metrics."):
            metric_values[key.removeprefix("metrics.")] = override.value()
        else:
            raise UserError(f"calibrun-calibrate cannot apply {text!r}: it takes only {OVERRIDE_HELP}.")
    return chosen, settings, metric_values


def _as_dict(node: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """The mapping ``node`` as a plain dict (OmegaConf's stubs type any container's result)."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve))


def _compose_all_calibrators(conf_dir: Path) -> DictConfig:
    """The default config with every ``conf/calibrator/*.yaml`` selected."""
    available = sorted(path.stem for path in (conf_dir / "calibrator").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=[f"calibrator=[{','.join(available)}]"])


def _record_refit(run_dir: Path, run_cfg: DictConfig, cfg: DictConfig, overrides: list[str]) -> None:
    """Make ``config.yaml`` say what the tables were made with, and log the refit."""
    refitted = _as_dict(cfg.calibrator, resolve=True)
    kept = _as_dict(run_cfg.get("calibrator") or OmegaConf.create({}), resolve=True)
    run_cfg.calibrator = {**kept, **refitted}
    OmegaConf.update(run_cfg, "metrics", OmegaConf.to_container(cfg.metrics), merge=True)
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(run_cfg))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": overrides,
             "refitted": list(refitted), "n_bins": cfg.metrics.n_bins, "calibrator": refitted}
    with open(run_dir / CALIBRATION_LOG, "a") as fh:
        fh.write(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------- logits made elsewhere


def calibrate_external(val: Path, test: Path, out: Path, overrides: list[str], conf_dir: Path,
                       name: str = "external", seed: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Make ``out`` a run folder for logits made outside calibrun (``calibrun-calibrate
    --val --test --out``): the ``metrics.csv``, ``metrics.md``, ``bins.csv``, figures and
    ``calibrators.json`` a training run writes, with calibrators fitted on ``val``.

    Calibrators and bins are ``conf/``'s defaults with ``overrides`` on top (as for
    :func:`refit_config`). ``name`` is the ``model`` column of ``calibrun-report`` and
    ``seed`` what it averages over; ``calibrun-calibrate OUT ...`` refits the folder later.
    Returns the table and the calibrators fitted.
    """
    splits = {"val": load_logits(val), "test": load_logits(test)}
    if splits["val"][0].shape[1] != splits["test"][0].shape[1]:
        raise UserError(f"{val} has {splits['val'][0].shape[1]} classes but {test} has "
                        f"{splits['test'][0].shape[1]}: they must come from the same model.")
    source = {"name": name, "val": str(val.resolve()), "test": str(test.resolve())}
    _check_empty_folder(out, source)
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        defaults = compose(config_name="config")
    cfg = refit_config(defaults, overrides, [], conf_dir)
    for split, (logits, labels) in splits.items():
        save_logits(logits_file(out, split), logits, labels)
    # What the folder was made with; "model" is a name here, where trained runs have a section.
    run_cfg = {"model": name, "seed": seed, "calibrator": OmegaConf.to_container(cfg.calibrator),
               "metrics": OmegaConf.to_container(cfg.metrics)}
    atomic_write_text(out / CONFIG, OmegaConf.to_yaml(OmegaConf.create(run_cfg)))
    atomic_write_text(out / EXTERNAL_SOURCE, json.dumps(source, indent=2) + "\n")
    table = calibrate_and_report(out, build_calibrators(cfg.calibrator), **metric_settings(cfg))
    write_status(out, "done")
    mark_done(out)
    return table, list(cfg.calibrator)


def _check_empty_folder(out: Path, source: dict[str, str]) -> None:
    """``out`` must be new or empty: a folder of results is never mixed with another's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created if missing).")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        same = json.loads((out / EXTERNAL_SOURCE).read_text()) == source
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        same = False
    if same:
        raise UserError(f"{out} already holds the results of these logits. Refit its calibrators with "
                        f"calibrun-calibrate {out} calibrator=[...], or choose another --out.")
    raise UserError(f"{out} is not empty; choose a new or empty folder for --out.")
