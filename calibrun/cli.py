"""Console scripts. ``calibrun`` is a Hydra app: ``calibrun key=value ...`` for one run,
``calibrun -m key=a,b ...`` for a sweep."""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from calibrun import UserError, samples, sweep
from calibrun._io import atomic_write_text
from calibrun.config import did_you_mean, first_line, unknown_key_problem
from calibrun.runfolder import METRICS, FolderRefused, resume_command

# ${calibrun.sample:cifar10} and ${calibrun.cache:cifar10} locate the image sets bundled
# with the package and their decode cache (conf/data/*_sample.yaml).
OmegaConf.register_new_resolver("calibrun.sample", samples.sample_root, replace=True)
OmegaConf.register_new_resolver("calibrun.cache", samples.cache_root, replace=True)


def config_dir() -> str:
    """The Hydra config root: inside the installed package (wheels carry it there) or at
    the top of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"calibrun's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}.")


log = logging.getLogger("calibrun")
# Errors of a folder calibrun cannot write to: permission denied, read-only file system, disk full.
WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class BelowError(logging.Filter):
    """Lets through records below ERROR: the console shows progress on stdout and errors
    on stderr only (conf/config.yaml, hydra.job_logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def console_logging() -> None:
    """The companion commands' console: progress and results on stdout (so that
    ``calibrun-report ... > table.md`` captures the table), errors alone on stderr."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[out, err])


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
def _calibrun(cfg: DictConfig) -> dict | None:
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
        return train.run(cfg, run_dir, snapshot=lambda: save_hydra_snapshot(run_dir, cfg))
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
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(run_dir.resolve()):
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


# Command-line flags that replace calibrun's primary config: the pre-check cannot know it.
OTHER_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "--experimental-rerun")
CONFIG_DIR_FLAGS = ("-cd", "--config-dir")


# OmegaConf.select's answer for a key that is not there (None is a value).
_ABSENT = object()


def _group_options(group: str, roots: list[Path]) -> list[str]:
    """The options of config group ``group``: its YAML files in any of the config ``roots``."""
    return sorted({p.stem for root in roots for p in (root / group).glob("*.yaml")})


def _option_problem(group: str, values: list[object], roots: list[Path]) -> str | None:
    """An option of config group ``group`` that has no YAML file in any of the config
    ``roots``, with the options they have."""
    options = _group_options(group, roots)
    for value in values:
        for option in value if isinstance(value, list) else [value]:
            if str(option) not in options and option is not None and str(option) != "null":
                return (f"{group}={option}: no such option.{did_you_mean(str(option), options)} "
                        f"{group} can be: {', '.join(options)}.")
    return None


def _added_config_dirs(argv: list[str], overrides: list) -> list[Path] | None:
    """The config folders a command adds to calibrun's (``--config-dir DIR`` and the
    ``file://`` entries of ``hydra.searchpath=[...]``), where a user's own components
    live; None when one is a ``pkg://`` entry, which only Hydra resolves."""
    dirs = [Path(arg.split("=", 1)[1]) for arg in argv if arg.split("=")[0] in CONFIG_DIR_FLAGS and "=" in arg]
    dirs += [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg in CONFIG_DIR_FLAGS]
    for override in overrides:
        if override.key_or_group == "hydra.searchpath":
            value = override.value()
            for entry in value if isinstance(value, list) else [value]:
                if str(entry).startswith("pkg://"):
                    return None
                dirs.append(Path(str(entry).removeprefix("file://")))
    return [d.resolve() for d in dirs]


def check_overrides(argv: list[str], conf: Path) -> str | None:
    """The first command-line override that names no config group option or no config key,
    said the way a user can act on; None when all exist (Hydra then composes as usual).
    Options and keys from folders added with ``--config-dir`` or ``hydra.searchpath`` count."""
    if any(arg.split("=")[0] in OTHER_CONFIG_FLAGS for arg in argv):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(_override_texts(argv))
    except HydraException:
        return None  # a syntax error: Hydra's message says where
    added = _added_config_dirs(argv, overrides)
    if added is None:
        return None
    roots = [conf, *added]
    groups = [o for o in overrides if "." not in o.key_or_group and not o.key_or_group.startswith("hydra")
              and any((root / o.key_or_group).is_dir() for root in roots)
              and o.package is None and not o.is_delete() and not o.is_add()]
    for override in groups:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        problem = _option_problem(override.key_or_group, values, roots)
        if problem:
            return problem
    first = [f"{o.key_or_group}={_first_value(o)}" for o in groups]
    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in added)}]"] if added else []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*search, *first])
        for override in overrides:
            key = override.key_or_group
            if override in groups or override.is_add() or override.is_force_add() or override.is_delete() \
                    or key.startswith("hydra") or override.package is not None:
                continue
            problem = unknown_key_problem(key, cfg)
            if problem:
                return problem + _owners_hint(key, roots, [*search, *first])
    return None


def _owners_hint(key: str, roots: list[Path], overrides: list[str]) -> str:
    """For a key of a config group's option that the chosen option lacks (``loss.lam``
    beside the default ``loss=ce``): the options that have it, composed as the run would
    be. Called inside an initialised Hydra config folder."""
    group = key.split(".")[0]
    options = _group_options(group, roots)
    others = [o for o in overrides if o.split("=")[0] != group]
    owners = []
    for option in options:
        try:
            cfg = compose(config_name="config", overrides=[*others, f"{group}={option}"])
        except (HydraException, OmegaConfBaseException):
            continue  # an option that needs other choices cannot own the key here
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            owners.append(option)
    if not owners:
        return ""
    return (f" {key} belongs to {group}={', '.join(owners)}: choose one on the command line, "
            f"e.g. {group}={owners[0]} {key}=...")


def _first_value(override: object) -> str:
    """The first value of a (possibly swept) group override, as override text."""
    value = next(iter(override.sweep_iterator())) if override.is_sweep_override() else override.value()
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


# Flags after which Hydra answers a question (help, completion, its own info) instead of
# running: the config checks below must not stand in their way.
QUERY_FLAGS = ("-h", "--help", "--hydra-help", "-sc", "--shell-completion", "-i", "--info")
# Flags that print the composed config: unknown keys are still caught, values are not judged.
PRINT_FLAGS = ("-c", "--cfg", "-p", "--package", "--resolve")


def _override_texts(argv: list[str]) -> list[str]:
    """The overrides of a command line: ``key=value`` words that are not a flag's value."""
    flag_values = {argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in (*CONFIG_DIR_FLAGS, *OTHER_CONFIG_FLAGS)}
    return [a for a in argv if "=" in a and not a.startswith("-") and a not in flag_values]


def _value_variants(overrides: list) -> list[list[str]]:
    """Override lists to compose, so that every value of every swept key is composed once
    (the other swept keys at their first value): a sweep's bad value stops the command
    before its first job, not in the middle of the sweep."""
    plain = [o for o in overrides if not o.key_or_group.startswith("hydra") or o.key_or_group == "hydra.searchpath"]

    def text(override: object, value: str | None = None) -> str:
        if value is None and not override.is_sweep_override():
            return override.input_line
        value = value if value is not None else next(iter(override.sweep_string_iterator()))
        return f"{override.get_key_element()}={value}"

    first = [text(o) for o in plain]
    variants = [first]
    for i, override in enumerate(plain):
        if override.is_sweep_override():
            variants += [[*first[:i], text(override, v), *first[i + 1:]] for v in list(override.sweep_string_iterator())[1:]]
    return variants


def check_values(argv: list[str], conf: Path) -> str | None:
    """The first config the schemas reject (a wrong type, a value out of range, an added
    key no component takes), composed as the run would be: one line before any folder is
    made, instead of an error logged from inside a new run folder."""
    from calibrun.config import validate

    if any(arg.split("=")[0] in OTHER_CONFIG_FLAGS for arg in argv):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(_override_texts(argv))
    except HydraException:
        return None  # a syntax error: Hydra's message says where
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for variant in _value_variants(overrides):
            try:
                validate(compose(config_name="config", overrides=variant))
            except UserError as err:
                return str(err)
    return None


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
                problem = check_values(argv, Path(config_dir()))
        except (HydraException, OmegaConfBaseException):
            problem = None  # whatever else is wrong, Hydra reports it
    if problem:
        print(f"calibrun: {problem}", file=sys.stderr)
        sys.exit(1)
    _calibrun()


def calibrate(argv: list[str] | None = None) -> None:
    """``calibrun-calibrate RUN_DIR [calibrator=[...]] [calibrator.<name>.<key>=...]
    [metrics.n_bins=M]``: refit the post-hoc calibrators of a finished run from its saved
    logits (no model, no data), starting from the run's own calibrator settings, and
    rewrite its tables and figures. Calibrators not named keep their rows, unless
    metrics.n_bins changes: then every calibrator in the table is refitted. The run's
    config.yaml is updated to match, and each refit is logged in calibrations.jsonl.

    ``calibrun-calibrate --val VAL --test TEST --out DIR [overrides]``: the same tables,
    figures and fitted calibrators for logits made outside calibrun (.npz or .pt files
    holding 'logits' and 'labels'), in a new run folder DIR that calibrun-report reads."""
    from calibrun.evaluate import calibrate_external, console_table, recalibrate

    args = _calibrate_arguments(argv)
    external = args.val is not None
    console_logging()
    folder = args.out if external else args.run_dir
    try:
        if external:
            table, fitted = calibrate_external(args.val, args.test, args.out, args.overrides, Path(config_dir()),
                                               name=args.name, seed=args.seed)
        else:
            table, fitted = recalibrate(args.run_dir, args.overrides, Path(config_dir()))
    except (UserError, HydraException, OmegaConfBaseException) as err:
        # HydraException, OmegaConfBaseException: a config the composition itself rejects;
        # their messages can span lines, and an error must stay one line.
        log.error("%s", "; ".join(line.strip() for line in str(err).splitlines() if line.strip()))
        sys.exit(1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        log.error("Cannot write %s: %s.", err.filename or folder, err.strerror)
        sys.exit(1)
    log.info("%s %s in %s\n%s", "Fitted" if external else "Refitted", ", ".join(["none", *fitted]), folder,
             console_table(table))


def _calibrate_arguments(argv: list[str] | None) -> argparse.Namespace:
    """``calibrun-calibrate``'s arguments: a run folder, or --val, --test and --out."""
    parser = argparse.ArgumentParser(prog="calibrun-calibrate", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=inspect.cleandoc(calibrate.__doc__ or "").replace("``", ""))
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished run folder (omit with --val/--test)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. calibrator=[temperature,isotonic]")
    parser.add_argument("--val", type=Path, help="validation logits (.npz or .pt) the calibrators are fitted on")
    parser.add_argument("--test", type=Path, help="test logits (.npz or .pt) the tables report")
    parser.add_argument("--out", type=Path, help="new run folder for --val/--test")
    parser.add_argument("--name", default="external", help="the model's name in reports (default: external)")
    parser.add_argument("--seed", type=int, help="the seed behind these logits, for reports over seeds")
    args = parser.parse_args(argv)
    if args.val or args.test or args.out:
        if not (args.val and args.test and args.out):
            parser.error("--val, --test and --out go together: give all three.")
        if args.run_dir is not None and "=" not in str(args.run_dir):
            parser.error(f"give a run folder ({args.run_dir}) or --val, --test and --out, not both.")
        if args.run_dir is not None:
            # argparse reads the first override as RUN_DIR: give it back.
            args.overrides.insert(0, str(args.run_dir))
            args.run_dir = None
    elif args.run_dir is None:
        parser.error("give a finished run folder, or --val, --test and --out for logits made elsewhere.")
    return args


def evaluate(argv: list[str] | None = None) -> None:
    """``calibrun-evaluate RUN_DIR shift=NAME [ood=NAME] [shift.root=DIR] ...``: evaluate a
    finished run on corrupted test sets and out-of-distribution images with the run's own
    weights and calibrators (fitted on its validation logits, never refitted), writing
    shift/ and ood/ tables and figures into the run folder. What is already there is
    skipped."""
    from calibrun.robustness import EVALUATE_HELP, evaluate_beyond_test, evaluation_config, trained_predictor

    parser = argparse.ArgumentParser(prog="calibrun-evaluate", description=evaluate.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides: {EVALUATE_HELP}")
    args = parser.parse_args(argv)
    console_logging()
    try:
        cfg = evaluation_config(args.run_dir, args.overrides, Path(config_dir()))
        evaluate_beyond_test(args.run_dir, cfg, trained_predictor(args.run_dir, cfg))
    except (UserError, HydraException, OmegaConfBaseException) as err:
        log.error("%s", "; ".join(line.strip() for line in str(err).splitlines() if line.strip()))
        sys.exit(1)
    written = [p for p in (args.run_dir / "shift" / METRICS, args.run_dir / "ood" / METRICS) if p.is_file()]
    log.info("Results: %s", ", ".join(map(str, written)))


def report(argv: list[str] | None = None) -> None:
    """``calibrun-report DIR... [--out DIR] [--metric ece]``: one table (mean ± std over
    seeds, grouped by the config keys that differ between runs) and plots from many run
    folders. Failed and unfinished runs are listed, never dropped."""
    from calibrun import report as report_lib
    from calibrun.metrics import METRIC_NAMES

    parser = argparse.ArgumentParser(prog="calibrun-report", description=report.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders or folders that contain them")
    parser.add_argument("--out", type=Path, help="where to write (default: the first DIR)")
    parser.add_argument("--metric", default="ece", choices=METRIC_NAMES,
                        help="the metric plotted against λ")
    parser.add_argument("--name", default="report", help="base name of the .csv/.md files")
    parser.add_argument("--calibrators", help="comma-separated calibrators to keep (default: all)")
    parser.add_argument("--paper", help="published numbers to show beside ours: table1, pacs, ls, or a CSV path")
    parser.add_argument("--grid-calibrator", default="none", help="calibrator drawn in the reliability grid")
    parser.add_argument("--grid-name", default="reliability_grid.png")
    parser.add_argument("--table-metrics", default="accuracy,ece,mce,nll,brier",
                        help="comma-separated metrics and scalar fitted parameters (e.g. temperature.T) to show")
    parser.add_argument("--pivot", help="config key spread across the columns, e.g. data.target")
    parser.add_argument("--caption", help="text written under the table's title, e.g. the setting it was run in")
    args = parser.parse_args(argv)
    console_logging()
    out = args.out or args.dirs[0]
    try:
        summary = report_lib.write_report(
            args.dirs, out, metric=args.metric, name=args.name,
            calibrators=args.calibrators.split(",") if args.calibrators else None, paper=args.paper,
            grid_calibrator=args.grid_calibrator, grid_name=args.grid_name,
            table_metrics=args.table_metrics.split(","), pivot=args.pivot, caption=args.caption,
        )
    except UserError as err:
        log.error("%s", err)
        sys.exit(1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        log.error("Cannot write %s: %s. Give a writable folder with --out.", err.filename or out, err.strerror)
        sys.exit(1)
    log.info("%s\nWrote %s and %s", (out / f"{args.name}.md").read_text(), out / f"{args.name}.csv",
             "plots" if len(summary) else "no plots (no finished runs)")
