"""Calibration beyond the clean test split: corrupted test sets (``shift``) and
out-of-distribution detection (``ood``), for a trained run (docs/design.md §7.3).

The calibrators are those of the run, fitted on its own validation logits; nothing is
ever refitted on shifted or out-of-distribution data. Results go under the run folder:

- ``shift/metrics.csv`` (``corruption, severity, calibrator`` and every metric column of
  ``metrics.csv``), ``shift/bins.csv`` and ``shift/figures/``;
- ``ood/metrics.csv`` (``dataset, score, calibrator, auroc, aupr_in, aupr_out, fpr95,
  n``) and ``ood/figures/``.

Both tables are rewritten after every corruption block or OOD set, so an interrupted
evaluation keeps what it finished, and a repeated one skips it. ``shift/state.json``
records the fitted calibrators and bins the rows were made with; when they change, the
rows are computed again.

References: Ovadia et al. 2019, "Can You Trust Your Model's Uncertainty? Evaluating
Predictive Uncertainty Under Dataset Shift"; Hendrycks & Dietterich 2019 (CIFAR-10-C).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from calibrun import UserError
from calibrun._io import atomic_write_text
from calibrun.calibrators import Calibrator
from calibrun.config import Select, build_component, did_you_mean, first_line, unknown_key_problem, validate
from calibrun.data import DeviceLoader, Split, Transform
from calibrun.detection import DETECTION_METRICS, SCORES, detection_metrics
from calibrun.calibration import Decisions, collapse_warning, decision_columns, load_calibrators, metric_settings
from calibrun.logits import load_logits
from calibrun.metrics import METRIC_NAMES, bin_stats, collapse_threshold, pool_bins, scores
from calibrun.selective import curve_points
from calibrun.plots import in_out_histogram, reliability_with_histogram, risk_coverage, severity_boxes
from calibrun.predict import load_checkpoint, predict, resolve_device
from calibrun.runfolder import (BINS, METRICS, RISK_COVERAGE, BrokenFile, logits_file, read_run_table,
                                require_finished_run, run_config)

log = logging.getLogger(__name__)

SHIFT_COLUMNS = ["corruption", "severity", "calibrator", *METRIC_NAMES, "n"]
SHIFT_BIN_COLUMNS = ["corruption", "severity", "calibrator", "bin", "lo", "hi", "count", "conf", "acc"]
SHIFT_CURVE_COLUMNS = ["corruption", "severity", "calibrator", "coverage", "risk"]
# The columns of shift/metrics.md, averaged over the corruptions of each severity.
SUMMARY_METRICS = ("accuracy", "ece", "nll", "aurc", "augrc")
OOD_COLUMNS = ["dataset", "score", "calibrator", *DETECTION_METRICS, "n"]


class ShiftedSets(Protocol):
    """What ``shift`` builds (e.g. :class:`calibrun.data.CorruptedCIFAR`)."""

    def sets(self) -> Iterator[tuple[str, int, Split]]:
        """(corruption, severity, split) per block."""


class OodSet(Protocol):
    """What ``ood`` builds (e.g. :class:`calibrun.data.SVHN`)."""

    @property
    def name(self) -> str:
        """The set's name in ``ood/metrics.csv`` and the figures."""

    def split(self) -> Split:
        """The out-of-distribution images."""


@dataclass
class Predictor:
    """The trained model with the evaluation transform of its data, on its device."""

    model: torch.nn.Module  # the model, or its torch.compile wrapper (a Module too): predict calls its eval()
    transform: Transform
    device: torch.device
    batch_size: int
    channels_last: bool = False

    def logits(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """float32 logits and labels of ``split``, batches cut on the device."""
        loader = DeviceLoader(split, self.batch_size, self.device, self.transform, channels_last=self.channels_last)
        logits, labels = predict(self.model, loader)
        return logits.cpu().numpy(), labels.cpu().numpy()


def evaluate_beyond_test(run_dir: Path, cfg: DictConfig, predictor: Predictor) -> None:
    """The shift and OOD evaluations the config names (``shift``, ``ood``), if any."""
    if not (cfg.get("shift") or cfg.get("ood")):
        return
    # As the run fitted them on its validation split (calibrators.json): nothing is refitted.
    calibrators = load_calibrators(run_dir)
    if cfg.get("shift"):
        shift = build_component(cfg.shift, "shift")
        if shift.num_classes != cfg.data.num_classes:
            raise UserError(f"shift={shift.name} has {shift.num_classes} classes but the model was trained on "
                            f"{cfg.data.num_classes}; pick the corrupted release of the training data.")
        margin = metric_settings(cfg)["collapse_margin"]
        evaluate_shift(run_dir, shift, predictor, calibrators, cfg.metrics.n_bins, Decisions.of_run(run_dir, cfg),
                       (collapse_threshold(cfg.data.num_classes, margin), margin))
    if cfg.get("ood"):
        evaluate_ood(run_dir, build_component(cfg.ood, "ood"), predictor, calibrators, cfg.metrics.n_bins)


# --------------------------------------------------------------------------- shift


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    """A results table written earlier, or an empty one. A broken one is named in one
    line and computed again: these tables are a cache of what the run's weights give."""
    if path.is_file():
        try:
            table = read_run_table(path, tuple(columns))
            if list(table.columns) == columns:
                return table
            log.warning("%s has other columns than %s; computing it again.", path, ", ".join(columns))
        except BrokenFile as err:
            log.warning("%s; computing it again.", err)
    return pd.DataFrame(columns=columns)


def _state(calibrators: dict[str, Calibrator], n_bins: int, decisions: Decisions | None = None) -> str:
    """A fingerprint of what the rows depend on besides the images: the fitted calibrators,
    the bins, and the coverages and conformal quantiles of ``decisions``."""
    params = {name: c.params() for name, c in calibrators.items()}
    extra = {} if decisions is None else {"decisions": [list(decisions.coverages), decisions.quantiles,
                                                        asdict(decisions.sets) if decisions.sets else None]}
    fingerprint = json.dumps({"n_bins": n_bins, "params": params, **extra}, sort_keys=True)
    return hashlib.sha256(fingerprint.encode()).hexdigest()


def _previous(out: Path, state: str, tables: dict[str, list[str]]) -> list[pd.DataFrame]:
    """The tables in ``out`` if they were made with ``state``, else empty ones."""
    state_file = out / "state.json"
    same = state_file.is_file() and json.loads(state_file.read_text() or "{}").get("state") == state
    if not same and any((out / name).exists() for name in tables):
        log.info("%s was made with other calibrators or bins; computing it again.", out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_file, json.dumps({"state": state}) + "\n")
    return [_read_table(out / name, columns) if same else pd.DataFrame(columns=columns)
            for name, columns in tables.items()]


def _score_block(z: np.ndarray, y: np.ndarray, calibrators: dict[str, Calibrator], n_bins: int,
                 key: dict[str, object], decisions: Decisions) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metric rows, reliability bins and risk–coverage curves of every calibrator on one
    block of logits; the conformal sets use the quantiles of the clean validation split."""
    rows, bins, curves = [], [], []
    for name, calibrator in calibrators.items():
        probs = calibrator.predict_proba(z)
        rows.append({**key, "calibrator": name, **scores(probs, y, n_bins), **decisions.row(name, probs, y)})
        bins.append(bin_stats(probs, y, n_bins).assign(**key, calibrator=name))
        curves.append(curve_points(probs, y).assign(**key, calibrator=name))
    return pd.DataFrame(rows), pd.concat(bins, ignore_index=True), pd.concat(curves, ignore_index=True)


def evaluate_shift(run_dir: Path, shift: ShiftedSets, predictor: Predictor, calibrators: dict[str, Calibrator],
                   n_bins: int, decisions: Decisions | None = None,
                   collapse: tuple[float, float] | None = None) -> pd.DataFrame:
    """Every (corruption, severity) block of ``shift.sets()`` not yet in ``shift/metrics.csv``,
    with the selective risks and conformal sets of ``decisions`` (the run's, by default none);
    ``collapse`` = (threshold, margin) of the run, for metrics.md's warning on a collapsed run."""
    out = run_dir / "shift"
    decisions = decisions or Decisions()
    columns = [*SHIFT_COLUMNS, *decisions.columns()]
    table, bins, curves = _previous(out, _state(calibrators, n_bins, decisions),
                                    {METRICS: columns, BINS: SHIFT_BIN_COLUMNS, RISK_COVERAGE: SHIFT_CURVE_COLUMNS})
    done = set(zip(table["corruption"], table["severity"].astype(int)))
    images, seconds = 0, 0.0
    for corruption, severity, split in shift.sets():
        if (corruption, severity) in done:
            continue
        start = time.perf_counter()
        z, y = predictor.logits(split)
        seconds, images = seconds + time.perf_counter() - start, images + len(y)
        new_rows, new_bins, new_curves = _score_block(z, y, calibrators, n_bins,
                                                      {"corruption": corruption, "severity": severity}, decisions)
        table = pd.concat([table, new_rows[columns]], ignore_index=True)
        bins = pd.concat([bins, new_bins[SHIFT_BIN_COLUMNS]], ignore_index=True)
        curves = pd.concat([curves, new_curves[SHIFT_CURVE_COLUMNS]], ignore_index=True)
        atomic_write_text(out / METRICS, table.to_csv(index=False))
        atomic_write_text(out / BINS, bins.to_csv(index=False))
        atomic_write_text(out / RISK_COVERAGE, curves.to_csv(index=False))
        ece = new_rows.set_index("calibrator")["ece"]
        log.info("shift %s severity %d: accuracy %.4f, ECE %s", corruption, severity, new_rows["accuracy"].iloc[0],
                 ", ".join(f"{name} {value:.4f}" for name, value in ece.items()))
    if images:
        log.info("shift: %d images in %.1f s (%.0f images/s)", images, seconds, images / max(seconds, 1e-9))
    else:
        log.info("shift: every block asked for is already in %s", out / METRICS)
    if len(table):
        clean = _clean_rows(run_dir)
        shift_figures(out / "figures", table, bins, clean, curves)
        atomic_write_text(out / "metrics.md", severity_summary(table, decisions, clean, collapse))
    return table


def _clean_rows(run_dir: Path) -> pd.DataFrame | None:
    """The run's own test rows (the uncorrupted reference), if its table is readable."""
    try:
        metrics = pd.read_csv(run_dir / METRICS)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    return metrics[metrics["split"] == "test"]


def severity_summary(table: pd.DataFrame, decisions: Decisions, clean: pd.DataFrame | None,
                     collapse: tuple[float, float] | None = None) -> str:
    """shift/metrics.md: per severity (0: the clean test split) and calibrator, the mean over
    the corruptions of the main metrics, the selective risks and the conformal sets, under
    the warning of metrics.md when the run's clean rows are flagged collapsed."""
    columns = [*SUMMARY_METRICS, *decision_columns(table)]
    rows = table.astype({"severity": int}).groupby(["severity", "calibrator"], sort=False)[columns].mean()
    if clean is not None and set(columns) <= set(clean.columns):
        rows = pd.concat([clean.assign(severity=0).set_index(["severity", "calibrator"])[columns], rows])
    # By severity, each in the calibrators' order of the table.
    rows = rows.reset_index().sort_values("severity", kind="stable")
    warning = collapse_warning(clean, collapse) if clean is not None and "collapsed" in clean else []
    lines = ["# Under shift: the mean over the corruptions at each severity", "", *warning,
             "Severity 0 is the clean test split. Nothing is refitted on shifted images: the calibrators and the "
             "conformal quantiles are those of the clean validation split.", "",
             rows.to_markdown(index=False, floatfmt=".4f"), ""]
    if decisions.sets:
        lines.append(f"set_coverage_<score> is promised at least {1 - decisions.sets.alpha:.2f} only while test "
                     "images are exchangeable with the validation ones; under shift nothing promises it.")
    return "\n".join(lines) + "\n"


def shift_figures(folder: Path, table: pd.DataFrame, bins: pd.DataFrame, clean: pd.DataFrame | None,
                  curves: pd.DataFrame | None = None) -> None:
    """ECE and accuracy against severity (boxes over the corruptions), per severity and
    calibrator a reliability diagram over the pooled corruptions with its histogram, and
    per severity the risk–coverage curves averaged over the corruptions."""
    severity_boxes(table.astype({"severity": int}), folder / "severity_boxes.png", clean=clean)
    for severity, rows in ([] if curves is None else curves.groupby("severity", sort=True)):
        mean = rows.groupby(["calibrator", "coverage"], sort=False, as_index=False)["risk"].mean()
        aurc = table[table["severity"].astype(int) == int(severity)].groupby("calibrator", sort=False)["aurc"].mean()
        risk_coverage(mean, folder / f"risk_coverage_severity{int(severity)}.png",
                      f"Severity {int(severity)}: risk–coverage, mean over {rows['corruption'].nunique()} corruptions",
                      aurc=aurc.to_dict())
    for (severity, name), rows in bins.groupby(["severity", "calibrator"], sort=False):
        pooled, ece, mce = pool_bins(rows)
        n_corruptions = rows["corruption"].nunique()
        title = f"{name}, severity {int(severity)} ({n_corruptions} corruptions pooled)"
        reliability_with_histogram(pooled, folder / f"reliability_severity{int(severity)}_{name}.png", title, ece, mce)


# --------------------------------------------------------------------------- out of distribution


def evaluate_ood(run_dir: Path, ood: OodSet, predictor: Predictor, calibrators: dict[str, Calibrator],
                 n_bins: int) -> pd.DataFrame:
    """Detection metrics of every score after every calibrator, the run's test split as
    in-distribution and ``ood.split()`` as out-of-distribution; skipped if ``ood/metrics.csv``
    already holds the set."""
    out = run_dir / "ood"
    (table,) = _previous(out, _state(calibrators, n_bins), {METRICS: OOD_COLUMNS})
    if ood.name in set(table["dataset"]):
        log.info("ood %s: already in %s", ood.name, out / METRICS)
        return table
    z_in, _ = load_logits(logits_file(run_dir, "test"))
    z_out, _ = predictor.logits(ood.split())
    rows = []
    for name, calibrator in calibrators.items():
        p_in, p_out = calibrator.predict_proba(z_in), calibrator.predict_proba(z_out)
        for score_name, score in SCORES.items():
            rows.append({"dataset": ood.name, "score": score_name, "calibrator": name,
                         **detection_metrics(score(p_in), score(p_out)), "n": len(z_out)})
        auroc = next(r["auroc"] for r in rows[-len(SCORES):] if r["score"] == "msp")
        in_out_histogram(p_in.max(axis=1), p_out.max(axis=1), out / "figures" / f"confidence_{ood.name}_{name}.png",
                         "test (in-distribution)", f"{ood.name} (out-of-distribution)",
                         title=f"calibrator {name}: AUROC of the max probability {auroc:.3f}")
    new = pd.DataFrame(rows)[OOD_COLUMNS]
    table = pd.concat([table, new], ignore_index=True) if len(table) else new
    atomic_write_text(out / METRICS, table.to_csv(index=False))
    best = new[new["score"] == "msp"].set_index("calibrator")["auroc"]
    log.info("ood %s (%d images): AUROC of the max probability %s", ood.name, len(z_out),
             ", ".join(f"{name} {value:.4f}" for name, value in best.items()))
    return table


# --------------------------------------------------------------------------- calibrun-evaluate

EVALUATE_HELP = "shift=NAME, ood=NAME, shift.<key>=value, ood.<key>=value, trainer.device and trainer.eval_batch_size"


def evaluation_config(run_dir: Path, overrides: list[str], conf_dir: Path) -> DictConfig:
    """The run's own config with the ``shift``/``ood`` the overrides compose (from
    ``conf/shift``, ``conf/ood``) and the device settings they give, validated."""
    require_finished_run(run_dir)
    composed = _compose_evaluation(overrides, conf_dir)
    cfg = run_config(run_dir)
    with open_dict(cfg):
        for key in ("shift", "ood"):
            cfg[key] = composed.get(key) or cfg.get(key)
        for key in ("device", "eval_batch_size"):
            if any(o.startswith(f"trainer.{key}=") for o in overrides):
                cfg.trainer[key] = composed.trainer[key]
    if not (cfg.get("shift") or cfg.get("ood")):
        raise UserError("calibrun-evaluate needs shift=NAME and/or ood=NAME (see conf/shift and conf/ood).")
    # OmegaConf's stubs type any container's result; a DictConfig's is a dict.
    return validate(OmegaConf.create(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))))


def _compose_evaluation(overrides: list[str], conf_dir: Path) -> DictConfig:
    """calibrun's config composed with the ``shift``/``ood``/device ``overrides`` that
    calibrun-evaluate takes; a mistake in them is one UserError with a suggestion."""
    allowed = ("shift", "ood", "trainer.device", "trainer.eval_batch_size")
    keys = [text.split("=", 1)[0].lstrip("+~") for text in overrides]
    for text, key in zip(overrides, keys):
        if "=" not in text or not any(key == a or key.startswith(f"{a}.") for a in allowed):
            raise UserError(f"calibrun-evaluate cannot apply {text!r}: it takes {EVALUATE_HELP}.")
        options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        value = text.split("=", 1)[1]
        if key in ("shift", "ood") and value not in options:
            raise UserError(f"{text}: no such option.{did_you_mean(value, options)} "
                            f"{key} can be {', '.join(options) or '(none installed)'}.")
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides)
        except HydraException as err:
            # Which key is unknown, and its near miss, in the config the group choices compose.
            groups = [text for text, key in zip(overrides, keys) if key in ("shift", "ood")]
            chosen = compose(config_name="config", overrides=groups)
            problem = next(filter(None, (unknown_key_problem(key, chosen) for key in keys)), None)
            raise UserError(f"calibrun-evaluate: {problem or first_line(err)}") from None


def trained_predictor(run_dir: Path, cfg: DictConfig) -> Predictor:
    """The run's model with the weights it was evaluated with (``best.pt`` under
    ``trainer.select=best_val``, else ``last.pt``), on ``trainer.device``."""
    device = resolve_device(cfg.trainer.device)
    name = "best.pt" if cfg.trainer.select == Select.best_val else "last.pt"
    path = run_dir / "checkpoints" / name
    if not path.is_file():
        raise UserError(f"{path} is missing: the weights of {run_dir} are needed to evaluate it on new images.")
    model = build_component(cfg.model, "model")
    try:
        model.load_state_dict(load_checkpoint(path, device)["model"])
    except (KeyError, RuntimeError) as err:
        raise UserError(f"{path} does not hold weights of the run's model ({str(err).splitlines()[0]}).") from None
    data = build_component(cfg.data, "data")
    return Predictor(model.to(device).eval(), data.eval_transform, device, cfg.trainer.eval_batch_size)
