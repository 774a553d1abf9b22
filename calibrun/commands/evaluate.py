"""``calibrun-evaluate``: a finished run on corrupted test sets and OOD images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from calibrun.commands._console import console_logging, mistakes_exit
from calibrun.compose import config_dir
from calibrun.runfolder import METRICS

log = logging.getLogger("calibrun")


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
    with mistakes_exit(args.run_dir):
        cfg = evaluation_config(args.run_dir, args.overrides, Path(config_dir()))
        evaluate_beyond_test(args.run_dir, cfg, trained_predictor(args.run_dir, cfg))
    written = [p for p in (args.run_dir / "shift" / "metrics.md", args.run_dir / "shift" / METRICS,
                           args.run_dir / "ood" / METRICS) if p.is_file()]
    log.info("Results: %s", ", ".join(map(str, written)))
