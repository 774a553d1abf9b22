"""Who may write a run folder, and whether a command may continue what is in it.

A run folder belongs to one process at a time (:class:`RunLock`). A folder that already
holds a run is only continued (resumed, or skipped when ``DONE``) by the same experiment:
:func:`check_same_experiment` compares the new config with the folder's ``config.yaml``
before anything is written, and names the keys that differ.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pandas as pd
import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from calibrun import UserError
from calibrun._io import atomic_write_text
from calibrun.config import is_non_experiment_key

LOCK_FILE = ".lock"
# The files of a run folder that more than one module reads or writes (docs/design.md §7).
DONE = "DONE"
STATUS = "status.json"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
BINS = "bins.csv"
# Each calibrator against none on the same bootstrap resamples (calibrun.calibration).
DIFFERENCES = "differences.csv"
CALIBRATOR_PARAMS = "calibrators.json"
RISK_COVERAGE = "risk_coverage.csv"  # the test split's risk–coverage curve of each calibrator
CONFORMAL = "conformal.json"  # the conformal sets' settings and quantiles (metrics.conformal=true)
EXTERNAL_SOURCE = "source.json"  # where logits made outside calibrun came from


class FolderRefused(UserError):
    """The run folder holds another run, or another process is using it: nothing of it
    may change, the log file included."""

OWNER_FILE = ".lock.owner"


class RunLock:
    """An exclusive lock on a run folder; a second process is refused with the holder's
    host, pid and start time."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)

    def __enter__(self) -> RunLock:
        try:
            self.lock.acquire()
        except Timeout:
            owner = (self.run_dir / OWNER_FILE).read_text().strip() if (self.run_dir / OWNER_FILE).is_file() else "?"
            raise FolderRefused(f"{self.run_dir} is in use by another calibrun process ({owner}); wait for it to "
                            f"finish or stop it, or pick another run_name.") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.run_dir / OWNER_FILE).write_text(json.dumps(holder) + "\n")
        return self

    def __exit__(self, *exc: Any) -> None:
        (self.run_dir / OWNER_FILE).unlink(missing_ok=True)
        self.lock.release()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def experiment_differences(run_dir: Path, cfg: DictConfig) -> list[str]:
    """``key: old -> new`` for every experiment key in which ``cfg`` differs from the
    config the folder's run was started with (none if the folder holds no run yet)."""
    path = run_dir / CONFIG
    if not path.is_file():
        return []
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"Cannot read {path} ({str(err).splitlines()[0]}); the folder's run cannot be checked. "
                        "Pick another run_name, or delete the folder to start again.") from None
    if not isinstance(old, dict):
        raise UserError(f"{path} does not hold a config mapping; pick another run_name or delete the folder.")
    new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    before = {k: v for k, v in _flat(old).items() if not is_non_experiment_key(k)}
    after = {k: v for k, v in _flat(new).items() if not is_non_experiment_key(k)}
    return [f"{key}: {before.get(key, '(absent)')} -> {after.get(key, '(absent)')}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


def check_same_experiment(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse, before anything is written, a config that differs from the folder's run."""
    differences = experiment_differences(run_dir, cfg)
    if not differences:
        return
    state = "finished" if is_done(run_dir) else "started"
    shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
    hint = (" Calibrator and metrics settings of a finished run change with calibrun-calibrate RUN_DIR ...;"
            if all(d.startswith(("calibrator.", "metrics.")) for d in differences) else "")
    raise FolderRefused(f"{run_dir} holds a {state} run of another config ({shown}); nothing was changed there."
                    f"{hint} Use another run_name for a new experiment.")


def require_finished_run(run_dir: Path) -> None:
    """Raise a UserError unless ``run_dir`` holds a finished run (``DONE``, its config and
    its saved validation and test logits), which calibrun-calibrate and calibrun-evaluate
    start from; a path that does not exist is said to be so."""
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist. Give a run folder (outputs/runs/<data>/<loss>/<run_name>) "
                        "or, for logits of your own, --val VAL.npz --test TEST.npz --out DIR.")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder.")
    needed = [run_dir / DONE, run_dir / CONFIG, logits_file(run_dir, "val"), logits_file(run_dir, "test")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished calibrun run (missing: {', '.join(missing)}).")


def resume_command(argv: list[str], run_name: str) -> str:
    """The command that continues this run or sweep: the same arguments with its run_name
    fixed, since the default run_name is a timestamp that a new command would renew."""
    kept = [arg for arg in argv if not arg.startswith("run_name=")]
    return shlex.join(["calibrun", *kept, f"run_name={run_name}"])


def logits_file(run_dir: Path, split: str) -> Path:
    """The saved logits and labels of ``split`` (val, test) of the run in ``run_dir``."""
    return run_dir / "logits" / f"{split}.npz"


def write_status(run_dir: Path, state: str, epoch: int | None = None, error: str | None = None) -> None:
    """``status.json``: running, done, failed or interrupted, the last finished epoch, the error."""
    atomic_write_text(run_dir / STATUS, json.dumps({"state": state, "epoch": epoch, "error": error}, indent=2))


def recorded_epoch(run_dir: Path) -> int | None:
    """The ``epoch`` status.json last recorded (None if it records none or is unreadable)."""
    try:
        return json.loads((run_dir / STATUS).read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None


def is_done(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished (its ``DONE`` marker, written last)."""
    return (run_dir / DONE).is_file()


def mark_done(run_dir: Path) -> None:
    """Write ``DONE`` (the time), the last file a finished run gets."""
    atomic_write_text(run_dir / DONE, time.strftime("%Y-%m-%d %H:%M:%S\n"))


class BrokenFile(UserError):
    """A file of a run folder that cannot be read, or holds the wrong kind of value: named
    in one line. A command stops on it; the report lists the run as broken and goes on."""


def read_run_file(path: Path, parse: Callable[[str], Any], kind: type) -> Any:
    """``parse(text)`` of ``path`` (json.loads, yaml.safe_load), checked to be a ``kind``."""
    try:
        value = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise BrokenFile(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not isinstance(value, kind):
        raise BrokenFile(f"{path}: expected a {kind.__name__}, found {type(value).__name__}")
    return value


def read_run_table(path: Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV of a run folder that must have ``columns``."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise BrokenFile(f"{path}: {str(err).splitlines()[0]}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise BrokenFile(f"{path}: lacks the column(s) {', '.join(missing)}")
    return table


def run_config(run_dir: Path) -> DictConfig:
    """The config the run in ``run_dir`` was made with (its ``config.yaml``)."""
    return OmegaConf.create(read_run_file(run_dir / CONFIG, yaml.safe_load, dict))


def group_choices(run_dir: Path) -> dict:
    """The config group options the run was composed from (``data: cifar10_sample``, ...),
    from ``.hydra/hydra.yaml``; empty when there is none (a run made through the API or
    logits made elsewhere)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    hydra = read_run_file(path, yaml.safe_load, dict).get("hydra")
    runtime = hydra.get("runtime") if isinstance(hydra, dict) else None
    choices = runtime.get("choices") if isinstance(runtime, dict) else None
    return choices if isinstance(choices, dict) else {}
