"""Bootstrap-interval benchmark: calibrun's count-weighted resamples against the naive loop.

A run with 10,000 test and 5,000 validation images of 10 classes and the default six
calibrators (seven rows per split with ``none``): what the intervals add to its
evaluation, measured three ways in the same process run:

- calibrun: every metric on 1,000 resamples of each of the 14 (split, calibrator) rows
  as count weights (``calibrun.bootstrap.resampled``), with the intervals and the paired
  differences to ``none``;
- naive: the same resamples as copies of the images, every metric recomputed on each
  (``calibrun.metrics.scores``), timed on ``--naive-resamples`` resamples per row and
  scaled to 1,000 (the values are checked against calibrun's on the way);
- end to end: ``calibrate_and_report`` on a run folder with the intervals on and off.

Prints each time, its spread over ``--repeats`` repeats, and the ratio. Run with
``make bench-intervals``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from calibrun import bootstrap
from calibrun.calibration import build_calibrators, calibrate_and_report
from calibrun.calibrators import Uncalibrated
from calibrun.compose import config_dir
from calibrun.logits import save_logits
from calibrun.metrics import METRIC_NAMES, scores
from calibrun.runfolder import logits_file


def synthetic_logits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overconfident logits: labels drawn from softmax(z / 1.5) of the logits z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 3.0
    truth = np.exp(z / 1.5)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = (truth.cumsum(axis=1) > rng.uniform(size=(n, 1))).argmax(axis=1)
    return z.astype(np.float32), labels


def calibrated_rows(val: tuple, test: tuple) -> dict[tuple[str, str], np.ndarray]:
    """The probabilities of every (split, calibrator) row of the default config."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config")
    calibrators = {"none": Uncalibrated(), **build_calibrators(cfg.calibrator)}
    rows = {}
    for name, calibrator in calibrators.items():
        calibrator.fit(*val)
        for split, (z, _) in (("val", val), ("test", test)):
            rows[(split, name)] = calibrator.predict_proba(z)
    return rows


def with_intervals(rows: dict, labels: dict, settings: bootstrap.Settings) -> float:
    """Seconds for calibrun's intervals and paired differences of every row."""
    started = time.perf_counter()
    for split in ("val", "test"):
        values, points, population = {}, {}, {}
        for (row_split, name), probs in rows.items():
            if row_split == split:
                scored = scores(probs, labels[split])
                points[name] = np.array([scored[m] for m in METRIC_NAMES])
                values[name] = bootstrap.resampled(probs, labels[split], 15, settings)
                population[name] = bootstrap.population_values(probs, labels[split], 15, points[name])
                bootstrap.interval_columns(values[name], points[name], settings, population[name])
        bootstrap.paired_differences(points, values, "none", settings, population)
    return time.perf_counter() - started


def naive(rows: dict, labels: dict, settings: bootstrap.Settings, resamples: int) -> tuple[float, float]:
    """(seconds per 1,000 resamples of every row, scaled from ``resamples`` each, and the
    largest difference to calibrun's values on the same resamples)."""
    seconds, worst = 0.0, 0.0
    for (split, _), probs in rows.items():
        y = labels[split]
        weights = next(bootstrap.resample_weights(len(y), settings))[:resamples]
        fast = bootstrap.resampled(probs, y, 15, settings._replace(resamples=resamples))
        started = time.perf_counter()
        for b, row in enumerate(weights):
            images = np.repeat(np.arange(len(y)), row.astype(int))
            recomputed = scores(probs[images], y[images], 15)
            worst = max(worst, max(abs(recomputed[m] - fast[i, b]) / max(abs(recomputed[m]), 1e-12)
                                   for i, m in enumerate(METRIC_NAMES)))
        seconds += (time.perf_counter() - started) * settings.resamples / resamples
    return seconds, worst


def end_to_end(val: tuple, test: tuple, intervals: bootstrap.Settings | None) -> float:
    """Seconds of ``calibrate_and_report`` with the default calibrators on a fresh folder."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config")
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        save_logits(logits_file(run, "val"), *val)
        save_logits(logits_file(run, "test"), *test)
        started = time.perf_counter()
        calibrate_and_report(run, build_calibrators(cfg.calibrator), intervals=intervals)
        return time.perf_counter() - started


def spread(times: list[float]) -> str:
    return f"median {statistics.median(times):.1f} s (min {min(times):.1f}, max {max(times):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", type=int, default=10_000, help="test images")
    parser.add_argument("--val", type=int, default=5_000, help="validation images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--naive-resamples", type=int, default=5, help="resamples per row timed in the naive loop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    val, test = synthetic_logits(args.val, args.classes, 0), synthetic_logits(args.test, args.classes, 1)
    rows = calibrated_rows(val, test)
    labels = {"val": val[1], "test": test[1]}
    settings = bootstrap.Settings(resamples=args.resamples)
    print(f"{len(rows)} rows ({args.test:,} test and {args.val:,} validation images, {args.classes} classes), "
          f"{args.resamples} resamples, {len(METRIC_NAMES)} metrics")
    ours = [with_intervals(rows, labels, settings) for _ in range(args.repeats)]
    print(f"calibrun (count weights):  {spread(ours)}")
    loops = [naive(rows, labels, settings, args.naive_resamples) for _ in range(args.repeats)]
    print(f"naive loop (scaled from {args.naive_resamples} resamples per row): {spread([t for t, _ in loops])}; "
          f"largest relative difference to calibrun's values {max(d for _, d in loops):.1e}")
    print(f"ratio naive / calibrun: {statistics.median([t for t, _ in loops]) / statistics.median(ours):.0f}x")
    on = [end_to_end(val, test, settings) for _ in range(args.repeats)]
    off = [end_to_end(val, test, None) for _ in range(args.repeats)]
    print(f"calibrate_and_report, intervals on:  {spread(on)}")
    print(f"calibrate_and_report, intervals off: {spread(off)}")
    print(f"added by the intervals: {statistics.median(on) - statistics.median(off):.1f} s")


if __name__ == "__main__":
    main()
