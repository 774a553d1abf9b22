"""``calibrun``: the Hydra app. ``calibrun key=value ...`` trains and evaluates one run,
``calibrun -m key=a,b ...`` a sweep. Mistakes in the arguments are caught before Hydra
makes a folder (:mod:`calibrun.overrides`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from calibrun import UserError, sweep
from calibrun._io import atomic_write_text
from calibrun.commands._console import WRITE_ERRORS
from calibrun.compose import config_dir
from calibrun.config import first_line
from calibrun.overrides import PRINT_FLAGS, QUERY_FLAGS, check_overrides, check_values
from calibrun.runfolder import FolderRefused, resume_command

log = logging.getLogger("calibrun")


def save_hydra_snapshot(run_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them,
    but only once calibrun has accepted the run (hydra.output_subdir is null): a refused
    command must not rewrite the record of the run already in the folder."""
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _calibrun(cfg: DictConfig) -> list[dict] | float | None:
    import torch

    from calibrun import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        _absolute_data_root(cfg)
        if multirun and cfg.trainer.device == "auto" and torch.cuda.is_available():
            with open_dict(cfg):
                cfg.trainer.device = spread_device(hydra_cfg.job.num, torch.cuda.device_count())
        if sweep.check_objective(cfg) is None:
            return train.run(cfg, run_dir, snapshot=lambda: save_hydra_snapshot(run_dir, cfg))
        train.run(cfg, run_dir, snapshot=lambda: save_hydra_snapshot(run_dir, cfg))
        # Read back from metrics.csv, so that a finished trial repeated (skipped) still answers.
        return sweep.objective(run_dir, cfg)
    except train.Interrupted as err:
        log.error("%s Resume with: %s", err, resume_command(sys.argv[1:], cfg.run_name))
        sys.exit(128 + err.signum)  # the shell's code for "killed by this signal"; also ends a sweep
    except KeyboardInterrupt:
        log.error("Interrupted by SIGINT. Resume with: %s", resume_command(sys.argv[1:], cfg.run_name))
        sys.exit(130)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        # A read-only or full output folder is the user's to fix, not a crash.
        log.error("Cannot write %s: %s. Choose a writable folder (hydra.run.dir, hydra.sweep.dir or run_name).",
                  err.filename or run_dir, err.strerror)
        sys.exit(1)
    except UserError as err:
        if isinstance(err, FolderRefused):
            _stop_logging_into(run_dir)
        log.error("%s", err)
        if not multirun:
            sys.exit(1)
        sweep.REFUSED.append((run_dir, str(err)))
    except Exception as err:
        if not multirun:
            raise
        log.exception("The job failed:")
        sweep.REFUSED.append((run_dir, f"{type(err).__name__}: {err}"))
    # A failed job of a sweep: the sweep goes on, and calibrun.sweep.SweepSummary lists it
    # at the end (its status.json says why) and sets the exit status.
    return None


def spread_device(job_num: int, gpus: int) -> str:
    """The GPU of job ``job_num`` of a sweep on a machine with ``gpus`` visible GPUs: jobs
    run side by side (hydra/launcher=joblib) take them in turn instead of all sharing the
    first. Under SLURM each job sees only its own GPU, which this leaves alone."""
    return f"cuda:{job_num % gpus}" if gpus > 1 else "cuda"


def _stop_logging_into(run_dir: Path) -> None:
    """Detach the log files inside ``run_dir`` (Hydra's calibrun.log): a refused command
    must leave a folder that holds another run exactly as it was."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        inside = isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(
            run_dir.resolve())
        if inside:
            root.removeHandler(handler)
            handler.close()


def _absolute_data_root(cfg: DictConfig) -> None:
    """Relative data roots mean "relative to where the user typed the command", whatever
    hydra.job.chdir says. Reading the root resolves it: a bad interpolation there (an
    unknown ${calibrun.sample:...}, an unset ${oc.env:...}) is the user's to fix."""
    try:
        if "root" in cfg.get("data", {}):
            with open_dict(cfg):
                cfg.data.root = hydra.utils.to_absolute_path(str(cfg.data.root))
    except OmegaConfBaseException as err:
        raise UserError(f"data.root cannot be resolved: {first_line(err)}") from None


def version_line() -> str:
    """``calibrun --version``: calibrun's version and those of what it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    from calibrun import __version__

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"calibrun {__version__} (Python {sys.version.split()[0]}, torch {of('torch')}, "
            f"torchvision {of('torchvision')}, hydra-core {of('hydra-core')})")


def main() -> None:
    """Entry point of the ``calibrun`` console script: unknown keys and options, and values
    the schemas reject, are caught here with the allowed ones and a suggestion, before
    Hydra makes a run folder."""
    argv = sys.argv[1:]
    if "--version" in argv:
        print(version_line())
        return
    problem = None
    if not any(arg.split("=")[0] in QUERY_FLAGS for arg in argv):
        try:
            problem = check_overrides(argv, Path(config_dir()))
            if problem is None and not any(arg.split("=")[0] in PRINT_FLAGS for arg in argv):
                problem = check_values(argv, Path(config_dir()), checks=(sweep.check_objective,))
        except (HydraException, OmegaConfBaseException):
            problem = None  # whatever else is wrong, Hydra reports it
    if problem:
        print(f"calibrun: {problem}", file=sys.stderr)
        sys.exit(1)
    _calibrun()
