"""``calibrun-calibrate``: refit a finished run's calibrators from its saved logits, or
calibrate logits made elsewhere into a run folder of their own."""

from __future__ import annotations

import argparse
import inspect
import logging
from pathlib import Path

from calibrun.commands._console import console_logging, mistakes_exit
from calibrun.compose import config_dir

log = logging.getLogger("calibrun")


def calibrate(argv: list[str] | None = None) -> None:
    """``calibrun-calibrate RUN_DIR [calibrator=[...]] [calibrator.<name>.<key>=...]
    [metrics.<key>=...]``: refit the post-hoc calibrators of a finished run from its saved
    logits (no model, no data), starting from the run's own calibrator settings, and
    rewrite its tables and figures. Calibrators not named keep their rows, unless a
    metrics setting changes (metrics.n_bins, metrics.resamples, ...): then every
    calibrator in the table is refitted. The run's
    config.yaml is updated to match, and each refit is logged in calibrations.jsonl.

    ``calibrun-calibrate --val VAL --test TEST --out DIR [overrides]``: the same tables,
    figures and fitted calibrators for logits made outside calibrun (.npz or .pt files
    holding 'logits' and 'labels'), in a new run folder DIR that calibrun-report reads."""
    from calibrun.calibration import calibrate_external, console_table, recalibrate

    args = _calibrate_arguments(argv)
    external = args.val is not None
    console_logging()
    folder = args.out if external else args.run_dir
    with mistakes_exit(folder):
        if external:
            table, fitted = calibrate_external(args.val, args.test, args.out, args.overrides, Path(config_dir()),
                                               name=args.name, seed=args.seed)
        else:
            table, fitted = recalibrate(args.run_dir, args.overrides, Path(config_dir()))
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
