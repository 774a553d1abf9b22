"""calibrun's 19 image corruptions timed beside the reference implementation on the same CIFAR images.

    python benchmarks/bench_corrupt.py --robustness robustness/.git \\
        --imagecorruptions /tmp/ic/imagecorruptions/corruptions.py \\
        [--images 500] [--repeats 3] [--corruptions fog,contrast,...] [--out outputs/bench/corrupt.csv]

The reference is Hendrycks & Dietterich (2019), ``ImageNet-C/create_c/make_cifar_c.py`` of
github.com/hendrycks/robustness, loaded as ``benchmarks/corrupt_reference.py`` loads it (see its
docstring for the compatibility substitutions and the stand-in for ImageMagick's motion blur). It
needs, besides calibrun's own dependencies (OpenCV included):

* the reference repository: ``git clone https://github.com/hendrycks/robustness`` (pass its
  ``.git`` directory; a bare mirror works too);
* imagecorruptions' ``corruptions.py`` (for ``_motion_blur``)::

      pip download --no-deps imagecorruptions==1.1.2 -d /tmp/icdl
      python -m zipfile -e /tmp/icdl/imagecorruptions-1.1.2-py3-none-any.whl /tmp/ic

* scikit-image: ``pip install scikit-image``.

Inputs: ``--images`` CIFAR-10 samples of ``calibrun/samples/cifar10/test``, stratified (the first
files of each class in sorted order). For each corruption and each of ``--repeats`` repeats, both
produce severities 1-5 of every image, timed with ``time.perf_counter``:

* reference: image by image, as make_cifar_c.py calls it,
  ``np.uint8(fn(PIL.Image.fromarray(img), severity))`` after ``np.random.seed`` (``ref.corrupt``);
* calibrun: ``corrupt(batch, name, severity, "cifar", seed)`` on the whole N×3×32×32 uint8 batch,
  on the CPU, with torch's default number of threads.

An untimed call of each on two images comes first (lazy imports, first-call set-up). Times are
printed in milliseconds per corrupted image (a repeat's time over ``5 × images``): the median over
repeats and [min–max]; the ratio reference/calibrun is the median [min–max] of the per-repeat
ratios. The last row sums all the corruptions run (per repeat, then the median). The rows also go
to the ``--out`` CSV.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from calibrun.corrupt import corrupt, corruptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corrupt_reference as ref  # noqa: E402

SEVERITIES = range(1, 6)
IMAGE_SUFFIXES = (".png", ".jpg")
WIDTH = 30  # characters of a printed "median [min–max]" cell


def read_images(n: int) -> np.ndarray:
    """``n`` CIFAR samples as (n, 32, 32, 3) uint8: the first files of each class, stratified."""
    classes = sorted(p for p in ref.CIFAR_DIR.iterdir() if p.is_dir())
    files = [sorted(p for p in c.iterdir() if p.suffix in IMAGE_SUFFIXES) for c in classes]
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    if any(k > len(f) for k, f in zip(per_class, files)):
        raise SystemExit(f"--images {n}: the samples have {sum(map(len, files))} images")
    return np.stack([ref.read_rgb(p) for f, k in zip(files, per_class) for p in f[:k]])


def load_reference(robustness: Path, imagecorruptions: Path, tmp: Path) -> types.ModuleType:
    """make_cifar_c.py's corruptions, extracted to ``tmp`` (it must outlive the run: frost reads there)."""
    paths = ref.extract_reference(robustness, tmp)
    motion_image = ref.make_motion_image(ref.load_motion_blur(imagecorruptions))
    module, _ = ref.load_recipe(paths["cifar"], "cifar", motion_image)
    return module


def time_reference(fn: Callable[..., object], name: str, images: np.ndarray) -> float:
    """Seconds for the reference to make severities 1-5 of every image, one image at a time."""
    start = time.perf_counter()
    for s in SEVERITIES:
        for i, img in enumerate(images):
            ref.corrupt(fn, img, s, ref.seed_of(name, s, i))
    return time.perf_counter() - start


def time_calibrun(name: str, batch: torch.Tensor) -> float:
    """Seconds for calibrun to make severities 1-5 of the whole N×3×H×W batch."""
    start = time.perf_counter()
    for s in SEVERITIES:
        corrupt(batch, name, s, "cifar", seed=ref.seed_of(name, s, 0))
    return time.perf_counter() - start


def summary(label: str, ref_s: list[float], ours_s: list[float], per: int) -> dict[str, object]:
    """One table row: ms per corrupted image (median, min, max) of both, and the ratio's."""
    row: dict[str, object] = {"corruption": label}
    ratios = [r / o for r, o in zip(ref_s, ours_s)]
    for key, values in (("reference_ms", [1e3 * t / per for t in ref_s]),
                        ("calibrun_ms", [1e3 * t / per for t in ours_s]), ("ratio", ratios)):
        row.update({f"{key}_median": statistics.median(values), f"{key}_min": min(values),
                    f"{key}_max": max(values)})
    return row


def format_row(row: dict[str, object]) -> str:
    """A row as printed: median [min–max] for each of the three columns."""
    cells = [f"{row['corruption']:<18}"]
    for key, digits in (("reference_ms", 3), ("calibrun_ms", 3), ("ratio", 2)):
        median, low, high = (float(row[f"{key}_{stat}"]) for stat in ("median", "min", "max"))  # type: ignore[arg-type]
        cells.append(f"{f'{median:8.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]':<{WIDTH}}")
    return "  ".join(cells).rstrip()


def header() -> str:
    """The table's column titles."""
    titles = ("reference ms/img [min–max]", "calibrun ms/img [min–max]", "ratio ref/calibrun [min–max]")
    return "  ".join([f"{'corruption':<18}"] + [f"{t:<{WIDTH}}" for t in titles]).rstrip()


def bench(module: types.ModuleType, names: list[str], images: np.ndarray, repeats: int) -> list[dict[str, object]]:
    """Time every corruption ``repeats`` times, printing its row as it comes; add the totals row."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    per = len(SEVERITIES) * len(images)
    rows, ref_all, ours_all = [], [], []
    print(header(), flush=True)
    for name in names:
        fn = getattr(module, name)
        ref.corrupt(fn, images[0], 1, 0)  # untimed warm-up, as for calibrun below
        corrupt(batch[:2], name, 1, "cifar", seed=0)
        ref_s, ours_s = [], []
        for _ in range(repeats):
            ref_s.append(time_reference(fn, name, images))
            ours_s.append(time_calibrun(name, batch))
        ref_all.append(ref_s)
        ours_all.append(ours_s)
        rows.append(summary(name, ref_s, ours_s, per))
        print(format_row(rows[-1]), flush=True)
    totals = summary(f"total ({len(names)})", [sum(r) for r in zip(*ref_all)], [sum(o) for o in zip(*ours_all)], per)
    rows.append(totals)
    print(format_row(totals), flush=True)
    return rows


def versions() -> str:
    """The library versions both ran under."""
    import cv2
    import scipy

    return (f"python {sys.version.split()[0]}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"scikit-image {importlib.metadata.version('scikit-image')}, opencv {cv2.__version__}, "
            f"Pillow {importlib.metadata.version('pillow')}, torch {torch.__version__}; "
            f"torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}")


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robustness", type=Path, required=True, help="git dir of hendrycks/robustness")
    parser.add_argument("--imagecorruptions", type=Path, required=True, help="imagecorruptions/corruptions.py")
    parser.add_argument("--images", type=int, default=500, help="CIFAR samples (at most 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--corruptions", help="comma-separated names (default: all 19)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/corrupt.csv"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    known = list(corruptions())
    names = args.corruptions.split(",") if args.corruptions else known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--corruptions: unknown {unknown}; choose from {', '.join(known)}")
    start = time.perf_counter()
    images = read_images(args.images)
    print(versions())
    print(f"{len(images)} CIFAR images × severities 1-5, {args.repeats} repeats: median [min–max]", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        module = load_reference(args.robustness, args.imagecorruptions, Path(tmp))
        rows = bench(module, names, images, args.repeats)
    frame = pd.DataFrame(rows).assign(images=len(images), repeats=args.repeats, threads=torch.get_num_threads())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
