"""Calibrator fit times at the sizes users bring, beside netcal's where netcal has the method.

    python benchmarks/bench_calibrators.py [--sizes 10000x10,50000x1000,1000000x100]
        [--repeats 3] [--calibrators temperature,vector,...] [--out outputs/bench/calibrators.csv]

Every calibrator of ``conf/calibrator`` (its YAML defaults) is fitted on synthetic
validation logits (``benchmarks/make_logits.py``'s overconfident model) of each size,
``--repeats`` times; the median and the spread (min–max) are printed as they come and
appended to the CSV. A calibrator whose ``too_costly`` refuses the size prints its one
line instead. netcal (``pip install netcal``, optional here) is timed in the same run on
the same data for the methods it has: temperature scaling (``method="mle"``), histogram
binning, isotonic regression and its BBQ (equal-width bins and a BIC score: not the
paper's BBQ that calibrun fits, so its ratio compares two methods). netcal takes
probabilities, calibrun logits; turning one into the other is not timed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from calibrun.compose import config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_logits import synthetic_logits  # noqa: E402

# calibrun's calibrator name -> how to build netcal's counterpart (None: netcal has none).
NETCAL = {
    "temperature": lambda m: m.scaling.TemperatureScaling(method="mle", detection=False, use_cuda=False),
    "histogram": lambda m: m.binning.HistogramBinning(bins=15),
    "isotonic": lambda m: m.binning.IsotonicRegression(),
    "bbq": lambda m: m.binning.BBQ(),
}


def timed(fit: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """Median, min and max seconds of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fit()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), min(seconds), max(seconds)


def calibrators(names: list[str] | None) -> dict[str, object]:
    """Every conf/calibrator YAML (or those named), built at its defaults."""
    found = {}
    for path in sorted((Path(config_dir()) / "calibrator").glob("*.yaml")):
        if names is None or path.stem in names:
            node = OmegaConf.load(path)[path.stem]
            found[path.stem] = lambda node=node: instantiate(node)
    return found


def bench_size(n: int, k: int, names: list[str] | None, repeats: int, writer: csv.writer,
               skip_netcal: set[str]) -> None:
    z, y = synthetic_logits(n, k, np.random.default_rng(0))
    probs = torch.softmax(torch.from_numpy(z).double(), dim=1).numpy()
    try:
        import netcal.binning
        import netcal.scaling
    except ImportError:
        netcal = None
        print("netcal is not installed (pip install netcal): its column stays empty")
    for name, build in calibrators(names).items():
        reason = build().too_costly(n, k)
        if reason is not None:
            print(f"{n:>9,} × {k:<5,} {name:<12} {reason}", flush=True)
            writer.writerow([n, k, name, "", "", "", "", "", "", reason])
            continue
        ours = timed(lambda: build().fit(z, y), repeats)
        theirs = (timed(lambda: NETCAL[name](netcal).fit(probs, y), repeats)
                  if netcal is not None and name in NETCAL and name not in skip_netcal else None)
        ratio = f"netcal/calibrun {theirs[0] / ours[0]:5.1f}" if theirs else ""
        shown = f"netcal {theirs[0]:7.2f} s [{theirs[1]:.2f}–{theirs[2]:.2f}]  {ratio}" if theirs else ""
        print(f"{n:>9,} × {k:<5,} {name:<12} calibrun {ours[0]:7.2f} s [{ours[1]:.2f}–{ours[2]:.2f}]  {shown}",
              flush=True)
        netcal_cells = [f"{v:.3f}" for v in theirs] if theirs else ["", "", ""]
        writer.writerow([n, k, name, *(f"{v:.3f}" for v in ours), *netcal_cells, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000x10,50000x1000,1000000x100", help="N×K sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibrators", help="comma-separated calibrator names (default: every conf/calibrator YAML)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/calibrators.csv"))
    parser.add_argument("--skip-netcal", default="", help="calibrators whose netcal counterpart is not timed "
                        "(netcal's BBQ fits some 200 histograms per class: slow at 1,000,000 × 100)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; repeats {args.repeats}: median [min–max]")
    with args.out.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if handle.tell() == 0:
            writer.writerow(["n", "k", "calibrator", "calibrun_s", "calibrun_min_s", "calibrun_max_s", "netcal_s",
                             "netcal_min_s", "netcal_max_s", "skipped"])
        for size in args.sizes.split(","):
            n, k = (int(v) for v in size.lower().split("x"))
            bench_size(n, k, args.calibrators.split(",") if args.calibrators else None, args.repeats, writer,
                       set(filter(None, args.skip_netcal.split(","))))
            handle.flush()


if __name__ == "__main__":
    main()
