"""What a sweep needs of a run besides the run itself.

- :class:`SweepSummary`, the end of a sweep: one line per job that failed or was
  interrupted, and the exit status. A Hydra callback (``hydra.callbacks`` in
  conf/config.yaml). Jobs never raise into Hydra (which would end the sweep with a
  traceback); each records its state in its own ``status.json``, which this reads, so it
  works for every launcher.
- :func:`objective`, the number a tuning sweeper (``hydra/sweeper=optuna``) minimises:
  ``objective.metric`` of the **validation** rows after ``objective.calibrator``, read
  from the run's ``metrics.csv``. A test metric is never an objective: tuning on it
  would leak the test split into the choice of λ.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from calibrun import UserError
from calibrun.runfolder import METRICS, STATUS, read_run_table, resume_command


# Jobs this process refused or saw fail before they wrote a status.json (a folder holding
# another config, say): (run folder, message). Launchers that run jobs in this process
# (the basic one) report them here; the others through status.json alone.
REFUSED: list[tuple[Path, str]] = []


class SweepSummary(Callback):
    """Lists the jobs of this sweep that did not finish and exits 1 if there are any."""

    def __init__(self) -> None:
        self.start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        unfinished = []
        for status_file in sorted(Path(str(config.hydra.sweep.dir)).glob(f"**/{STATUS}")):
            if status_file.stat().st_mtime < self.start - 1:
                continue  # a job of an earlier sweep into the same folder
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                status = {"state": "unreadable status.json"}
            if status.get("state") not in ("done", "running"):
                unfinished.append((status_file.parent.resolve(), status.get("state"), status.get("error")))
        seen = {folder for folder, _, _ in unfinished}
        unfinished += [(folder.resolve(), "refused", message) for folder, message in REFUSED
                       if folder.resolve() not in seen]
        REFUSED.clear()
        if not unfinished:
            return
        # Printed, not logged: after the last job, logging is still that job's set-up.
        for folder, state, error in unfinished:
            print(f"{state} job {folder}: {error}", file=sys.stderr)
        # The default run_name is a timestamp: the same command again would start afresh.
        print(f"{len(unfinished)} job(s) of the sweep did not finish. Resume them (the finished ones are "
              f"skipped) with: {resume_command(sys.argv[1:], str(config.run_name))}", file=sys.stderr)
        sys.exit(1)


def check_objective(cfg: DictConfig) -> str | None:
    """The objective's metric (None without one), or UserError naming the key: a metric of
    metrics.csv, after ``none`` or one of the run's calibrators."""
    metric = OmegaConf.select(cfg, "objective.metric")
    if metric is None:
        return None
    # Here, not at the top: the command line checks its arguments before torch is imported.
    from calibrun.metrics import METRIC_NAMES

    if metric not in METRIC_NAMES:
        raise UserError(f"objective.metric={metric} is not a metric; choose from {', '.join(METRIC_NAMES)}.")
    calibrator = OmegaConf.select(cfg, "objective.calibrator")
    chosen = ["none", *(cfg.get("calibrator") or {})]
    if calibrator not in chosen:
        raise UserError(f"objective.calibrator={calibrator} is not among the run's calibrators "
                        f"({', '.join(chosen)}); add it to calibrator=[...] or pick one of them.")
    return str(metric)


def objective(run_dir: Path, cfg: DictConfig) -> float | None:
    """``objective.metric`` on the validation split after ``objective.calibrator``, from
    the run's ``metrics.csv``; None without an objective or without that row (a failed run).

    The calibrators are fitted on the validation split, so for them the value is
    in-sample, as when a paper tunes a loss on its validation NLL after temperature
    scaling; the test split stays untouched until the chosen λ is reported."""
    metric = check_objective(cfg)
    if metric is None or not (run_dir / METRICS).is_file():
        return None
    table = read_run_table(run_dir / METRICS, ("split", "calibrator", metric))
    row = table[(table["split"] == "val") & (table["calibrator"] == cfg.objective.calibrator)]
    return None if row.empty or pd.isna(row[metric].iloc[0]) else float(row[metric].iloc[0])
