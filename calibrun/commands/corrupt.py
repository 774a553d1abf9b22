"""``calibrun-corrupt``: a corrupted copy of a dataset's test split (:mod:`calibrun.corrupt`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from calibrun.commands._console import console_logging, mistakes_exit

log = logging.getLogger("calibrun")

HELP = ("data=NAME, data.<key>=value, corruptions=[...], severities=[...], recipe=auto|cifar|imagenet, seed=N, "
        "subset=N, batch_size=N, device=cpu|cuda|auto, out=DIR (conf/corrupt.yaml)")


def main(argv: list[str] | None = None) -> None:
    """``calibrun-corrupt data=NAME [corruptions=[...]] [severities=[...]] [out=DIR] ...``:
    the test split of ``data`` under the 19 corruptions of Hendrycks & Dietterich (2019)
    at 5 severities, written as ``<corruption>.npy`` + ``labels.npy`` (the layout of
    CIFAR-10-C) for ``calibrun-evaluate RUN shift=cifar10c shift.root=OUT`` (CIFAR) or
    ``shift=corrupted shift.root=OUT`` (any dataset). What is already there is kept."""
    from calibrun.corrupt.command import corrupt_config, make_corrupted

    parser = argparse.ArgumentParser(prog="calibrun-corrupt", description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help=f"Hydra overrides: {HELP}")
    args = parser.parse_args(argv)
    console_logging()
    with mistakes_exit(None):
        cfg, label, out = corrupt_config(args.overrides)
        make_corrupted(cfg, label, Path(out))
