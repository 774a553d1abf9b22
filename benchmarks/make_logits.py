"""Synthetic validation and test logits of a chosen size, for timing calibrators on the
problem sizes users bring (ImageNet: 50,000 × 1,000) without a trained model.

    python benchmarks/make_logits.py OUT_DIR --n 50000 --classes 1000 [--seed 0]

writes OUT_DIR/val.npz and OUT_DIR/test.npz (``logits`` float32, ``labels`` int64), the
layout ``calibrun-calibrate --val --test`` reads. The logits are an overconfident model's:
Gaussian noise of standard deviation 2 with the true class raised by 10 on 80% of the
rows, then multiplied by 2.5 (so temperature scaling has work to do).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# The shape of the synthetic model: noise scale, margin of the true class, how often the
# true class gets it, and the overconfidence factor applied to everything.
NOISE, MARGIN, HIT_RATE, OVERCONFIDENCE = 2.0, 10.0, 0.8, 2.5


def synthetic_logits(n: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of ``classes`` logits and their labels, as described above."""
    labels = rng.integers(0, classes, n)
    logits = rng.standard_normal((n, classes), dtype=np.float32) * NOISE
    hit = rng.random(n) < HIT_RATE
    logits[np.flatnonzero(hit), labels[hit]] += MARGIN
    return logits * OVERCONFIDENCE, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=50_000, help="rows per split")
    parser.add_argument("--classes", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        logits, labels = synthetic_logits(args.n, args.classes, rng)
        np.savez(args.out / f"{split}.npz", logits=logits, labels=labels)
        print(f"{args.out / f'{split}.npz'}: {logits.shape[0]:,} × {logits.shape[1]:,}")


if __name__ == "__main__":
    main()
