"""``calibrun-report``: one table and figures over many run folders."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from calibrun.commands._console import console_logging, mistakes_exit

log = logging.getLogger("calibrun")


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
    parser.add_argument("--paper",
                        help="published numbers to show beside ours: table1, pacs, ls, baselines, or a CSV path")
    parser.add_argument("--grid-calibrator", default="none", help="calibrator drawn in the reliability grid")
    parser.add_argument("--grid-name", default="reliability_grid.png")
    parser.add_argument("--table-metrics", default=",".join(report_lib.TABLE_METRICS),
                        help="comma-separated metrics and scalar fitted parameters (e.g. temperature.T) to show")
    parser.add_argument("--pivot", help="config key spread across the columns, e.g. data.target")
    parser.add_argument("--keys", help="comma-separated config keys shown as the table's columns (default: every "
                        "key that differs; the CSV keeps them all)")
    parser.add_argument("--caption", help="text written under the table's title, e.g. the setting it was run in")
    parser.add_argument("--baseline", metavar="KEY=VALUE[,KEY=VALUE]",
                        help="compare every group with this one on the same test images (paired bootstrap, Holm)")
    args = parser.parse_args(argv)
    console_logging()
    out = args.out or args.dirs[0]
    with mistakes_exit(out, write_hint="Give a writable folder with --out."):
        summary = report_lib.write_report(
            args.dirs, out, metric=args.metric, name=args.name,
            calibrators=args.calibrators.split(",") if args.calibrators else None, paper=args.paper,
            grid_calibrator=args.grid_calibrator, grid_name=args.grid_name,
            table_metrics=args.table_metrics.split(","), pivot=args.pivot, caption=args.caption,
            baseline=args.baseline, table_keys=args.keys.split(",") if args.keys else None,
        )
    log.info("%s\nWrote %s and %s", (out / f"{args.name}.md").read_text(), out / f"{args.name}.csv",
             "plots" if len(summary) else "no plots (no finished runs)")
