"""Selective prediction: how useful a model's confidence is for abstaining.

A selective classifier answers only where its confidence (here the top-label
probability, the softmax response) is high enough; at coverage k/n it answers the k
most confident of n samples. Its selective risk is the error rate among those k. The
functions below take probabilities and labels, as :mod:`calibrun.metrics` does.

Ties: samples of equal confidence cannot be separated by a threshold, so the errors of
a tied block are spread evenly over its positions (the average over every order of the
block); the results do not depend on the order of the samples.

References: Geifman and El-Yaniv 2017, "Selective Classification for Deep Neural
Networks" (the risk–coverage curve); Geifman, Uziel and El-Yaniv 2019, "Bias-Reduced
Uncertainty Estimation for Deep Neural Classifiers" (ICLR), §3: AURC and E-AURC; Traub,
Bungert, Lüth, Baumgartner, Maier-Hein, Jäger and Jaeger 2024, "Overcoming Common Flaws
in the Evaluation of Selective Classification Systems" (NeurIPS): AUGRC.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# AURC, E-AURC and AUGRC are metrics (columns of every table, with intervals); here for
# the reader of selective prediction.
from calibrun.metrics import Weighted, augrc, aurc, excess_aurc, validated  # noqa: F401


def _cumulative_errors(probs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """E_k, the errors among the k most confident samples for k = 1..n (ties averaged),
    from the blocks of equal confidence that the AURC metrics use."""
    p, y = validated(probs, labels)
    weight, errors, _, errors_before = (block[0] for block in Weighted(p, y, 1, np.ones((1, len(y)))).selective_blocks)
    sizes = weight.astype(np.int64)
    within = np.arange(1, len(y) + 1) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(errors_before, sizes) + within * np.repeat(errors / weight, sizes)


def risk_coverage(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The risk–coverage curve: coverage k/n and selective risk E_k/k for k = 1..n."""
    errors = _cumulative_errors(probs, labels)
    k = np.arange(1, len(errors) + 1)
    return k / len(errors), errors / k


def risks_at(probs: ArrayLike, labels: ArrayLike, coverages: ArrayLike) -> np.ndarray:
    """The error rate among the ⌈c·n⌉ most confident samples for each coverage c in (0, 1]."""
    c = np.atleast_1d(np.asarray(coverages, dtype=np.float64))
    if not ((c > 0.0) & (c <= 1.0)).all():
        raise ValueError(f"coverages must lie in (0, 1], got {c.tolist()}")
    errors = _cumulative_errors(probs, labels)
    # The tolerance keeps 0.7 × 10 (7.000000000000001 in floating point) at 7 samples.
    k = np.maximum(1, np.ceil(c * len(errors) - 1e-9).astype(np.int64))
    return errors[k - 1] / k


def selective_risk(probs: ArrayLike, labels: ArrayLike, coverage: float) -> float:
    """The error rate among the ⌈coverage·n⌉ most confident samples, coverage in (0, 1]."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return float(risks_at(probs, labels, [coverage])[0])


def risk_column(coverage: float) -> str:
    """The table column of the selective risk at ``coverage``: ``risk_at_90`` for 0.9."""
    return f"risk_at_{100 * coverage:.4g}"


def risk_columns(probs: ArrayLike, labels: ArrayLike, coverages: list[float]) -> dict[str, float]:
    """The selective risk at each of ``coverages``, keyed by :func:`risk_column`."""
    return {risk_column(c): float(r) for c, r in zip(coverages, risks_at(probs, labels, coverages))}


# The coverages at which a run keeps its risk–coverage curves (risk_coverage.csv): enough
# points for a smooth line at any test size, and the same for every block so that curves
# of several corruptions can be averaged point by point.
CURVE_COVERAGES = np.arange(1, 101) / 100


def curve_points(probs: ArrayLike, labels: ArrayLike) -> pd.DataFrame:
    """The risk–coverage curve at :data:`CURVE_COVERAGES` (columns ``coverage``, ``risk``)."""
    return pd.DataFrame({"coverage": CURVE_COVERAGES, "risk": risks_at(probs, labels, CURVE_COVERAGES)})


def risks_at_weighted(sample: Weighted, coverages: list[float]) -> np.ndarray:
    """:func:`risks_at` under each row of the sample weights of ``sample`` (coverages × B):
    the error rate among the ⌈c·W⌉ most confident of the W weighted copies, a tied block's
    errors spread evenly over its positions. Gives the bootstrap its resampled values."""
    weight, errors, before, errors_before = sample.selective_blocks
    rows, blocks = weight.shape
    k = np.maximum(1.0, np.ceil(np.asarray(coverages)[:, None] * sample.total[None, :] - 1e-9))  # C × B
    reached = before + weight  # copies up to the end of each block, non-decreasing along a row
    # One search over all rows: offsetting row b by b·(its total + 1) keeps the array sorted.
    offset = (np.arange(rows) * (reached[:, -1].max() + 1))[:, None]
    block = np.searchsorted((reached + offset).ravel(), (k.T + offset).ravel(), side="left").reshape(rows, -1)
    block = np.minimum(block - (np.arange(rows) * blocks)[:, None], blocks - 1)
    take = lambda a: np.take_along_axis(a, block, axis=1)  # noqa: E731
    rate = np.divide(take(errors), take(weight), out=np.zeros(block.shape), where=take(weight) > 0)
    return ((take(errors_before) + (k.T - take(before)) * rate) / k.T).T
