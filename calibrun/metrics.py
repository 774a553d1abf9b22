"""Calibration metrics on predicted class probabilities.

Every metric takes ``probs`` (N x K, rows summing to 1; numpy array or torch tensor) and
integer ``labels`` (N,) and returns a fraction, not a percentage. The top-label
confidence of sample i is ``max_k p_ik``; it is correct when ``argmax_k p_ik == y_i``.

Equal-width bins are right-closed, B_m = ((m-1)/M, m/M], with 0 also in B_1, so every
confidence in [0, 1] lands in exactly one bin and a value equal to m/M lands in B_m.
All binned metrics, the reliability diagram and histogram binning
(``calibrun.calibrators``) go through :func:`equal_width_index`, so they always agree on
which sample sits in which bin. :data:`METRIC_NAMES` names what :func:`scores` returns,
in the column order of ``metrics.csv``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Union

import numpy as np
import pandas as pd
import torch

from calibrun import UserError

ArrayLike = Union[np.ndarray, torch.Tensor]

# Rows of a probability matrix sum to 1 up to float32 rounding; a larger deviation
# almost always means logits were passed by mistake.
_SUM_TOLERANCE = 1e-3
# Keeps the NLL finite when the true class was given probability 0.
_NLL_EPS = 1e-12


class Bins(NamedTuple):
    """Per-bin aggregates; ``conf`` and ``acc`` are NaN where ``count`` is 0."""

    count: np.ndarray
    conf: np.ndarray
    acc: np.ndarray


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16, so widen floating tensors before leaving torch.
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _validate(probs: ArrayLike, labels: ArrayLike, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(probs, labels)`` as float64 / int64 arrays or raise ``ValueError``."""
    p = _as_numpy(probs)
    y = _as_numpy(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D array of shape (N, K), got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of shape (N,), got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"probs has {p.shape[0]} rows but labels has {y.shape[0]} entries")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must be non-empty, got shape {p.shape}")
    if n_bins is not None and (isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1):
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if not np.issubdtype(p.dtype, np.number) or np.issubdtype(p.dtype, np.complexfloating):
        raise ValueError(f"probs must be real-valued, got dtype {p.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    p = p.astype(np.float64, copy=False)
    y = y.astype(np.int64, copy=False)
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    worst_sum_error = float(np.max(np.abs(p.sum(axis=1) - 1.0)))
    if worst_sum_error > _SUM_TOLERANCE or p.min() < -_SUM_TOLERANCE or p.max() > 1.0 + _SUM_TOLERANCE:
        raise ValueError(
            "probs must hold probabilities (not logits): each row must lie in [0, 1] and sum to 1 "
            f"(largest row-sum error {worst_sum_error:.3g}, value range [{p.min():.3g}, {p.max():.3g}]); "
            "apply softmax to logits first"
        )
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}] for {k} classes, got range [{y.min()}, {y.max()}]")
    return p, y


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and 0/1 correctness of each sample."""
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _bin_edges(n_bins: int) -> np.ndarray:
    # m / M is correctly rounded for every m, whereas np.linspace can land one ulp below
    # it (linspace(0, 1, 7)[5] < 5 / 6), which would push a confidence of exactly m / M
    # into the next bin.
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def equal_width_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """0-based bin of each confidence for the right-closed bins ((m-1)/M, m/M]."""
    # Searching only the interior edges sends 0 (and anything below) to the first bin
    # and 1.0 (and float overshoot above it) to the last, so no sample is ever dropped.
    return np.searchsorted(_bin_edges(n_bins)[1:-1], conf, side="left")


def _aggregate(index: np.ndarray, conf: np.ndarray, hit: np.ndarray, n_bins: int) -> Bins:
    """Count, mean confidence and mean hit rate of each of ``n_bins`` bins."""
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(index, weights=hit, minlength=n_bins)
    # Dividing only where count > 0 keeps empty bins at NaN without a RuntimeWarning.
    mean_conf = np.divide(conf_sum, count, out=np.full(n_bins, np.nan), where=count > 0)
    mean_acc = np.divide(hit_sum, count, out=np.full(n_bins, np.nan), where=count > 0)
    return Bins(count=count, conf=mean_conf, acc=mean_acc)


def equal_width_bins(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> Bins:
    """Count, mean score and mean hit rate of each equal-width bin of the scores ``conf``
    (float arrays, validated by the caller); ``hit`` is 1.0 where the sample counts as a hit."""
    return _aggregate(equal_width_index(conf, n_bins), conf, hit, n_bins)


def _filled(bins: Bins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight |B_m|/n, confidence and accuracy of the non-empty bins only."""
    filled = bins.count > 0
    return bins.count[filled] / bins.count.sum(), bins.conf[filled], bins.acc[filled]


def _weighted_gap(bins: Bins) -> float:
    """Sum over non-empty bins of |B_m|/n * |acc(B_m) - conf(B_m)|."""
    weight, conf, acc = _filled(bins)
    return float(np.sum(weight * np.abs(acc - conf)))


def bin_stats(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> pd.DataFrame:
    """Top-label reliability table over ``n_bins`` equal-width bins.

    Columns: ``bin`` (1..M), ``lo``, ``hi`` (bin edges), ``count`` (int), ``conf`` and
    ``acc`` (mean confidence and accuracy of the bin, NaN for an empty bin).

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    bins = equal_width_bins(*_top_label(p, y), n_bins)
    edges = _bin_edges(n_bins)
    return pd.DataFrame(
        {
            "bin": np.arange(1, n_bins + 1),
            "lo": edges[:-1],
            "hi": edges[1:],
            "count": bins.count.astype(np.int64),
            "conf": bins.conf,
            "acc": bins.acc,
        }
    )


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    p, y = _validate(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: sum_m |B_m|/n * |acc(B_m) - conf(B_m)|.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    return _weighted_gap(equal_width_bins(*_top_label(p, y), n_bins))


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: max over non-empty bins of |acc(B_m) - conf(B_m)|.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    _, conf, acc = _filled(equal_width_bins(*_top_label(p, y), n_bins))
    return float(np.max(np.abs(acc - conf)))


def adaptive_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Adaptive ECE (AdaECE): the top-label ECE over equal-mass bins, i.e. samples sorted
    by top-label confidence and split into ``n_bins`` groups of (nearly) equal size.

    With fewer samples than bins the surplus groups are empty and contribute nothing.
    This is *not* the ACE of Nixon et al. (2019), which averages equal-mass-bin errors
    over every class's probability rather than the top label's.

    References: Nguyen & O'Connor (2015), "Posterior calibration and exploratory analysis
    for natural language processing models" (equal-mass binning); Mukhoti et al. (2020),
    "Calibrating Deep Neural Networks using Focal Loss" (AdaECE).
    """
    p, y = _validate(probs, labels, n_bins)
    conf, hit = _top_label(p, y)
    order = np.argsort(conf, kind="stable")
    sizes = [len(group) for group in np.array_split(order, n_bins)]
    index = np.empty(len(conf), dtype=np.int64)
    index[order] = np.repeat(np.arange(n_bins), sizes)
    return _weighted_gap(_aggregate(index, conf, hit, n_bins))


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Classwise ECE: mean over classes k of the one-vs-rest ECE of p_ik against
    [y_i == k], each over ``n_bins`` equal-width bins of p_ik.

    References: Kull et al. (2019), "Beyond temperature scaling: Obtaining well-calibrated
    multiclass probabilities with Dirichlet calibration" (classwise-ECE); Nixon et al.
    (2019), "Measuring Calibration in Deep Learning" (the same quantity as SCE, the static
    calibration error).
    """
    p, y = _validate(probs, labels, n_bins)
    per_class = [
        _weighted_gap(equal_width_bins(p[:, k], (y == k).astype(np.float64), n_bins)) for k in range(p.shape[1])
    ]
    return float(np.mean(per_class))


def overconfidence_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Overconfidence error: sum_m |B_m|/n * conf(B_m) * max(conf(B_m) - acc(B_m), 0).

    References: Thulasidasan et al. (2019), "On Mixup Training: Improved Calibration and
    Predictive Uncertainty for Deep Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    weight, conf, acc = _filled(equal_width_bins(*_top_label(p, y), n_bins))
    return float(np.sum(weight * conf * np.maximum(conf - acc, 0.0)))


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class, with p clipped at 1e-12."""
    p, y = _validate(probs, labels)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _NLL_EPS, None))))


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_ik - [k == y_i])^2."""
    p, y = _validate(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


# The metrics of ``scores`` in the column order of metrics.csv and the sweep reports;
# each is called as f(probs, labels, n_bins), the unbinned ones ignoring n_bins.
_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": lambda p, y, n_bins: accuracy(p, y),
    "ece": ece,
    "mce": mce,
    "ada_ece": adaptive_ece,
    "classwise_ece": classwise_ece,
    "oe": overconfidence_error,
    "nll": lambda p, y, n_bins: nll(p, y),
    "brier": lambda p, y, n_bins: brier(p, y),
}
METRIC_NAMES: tuple[str, ...] = tuple(_METRICS)


# A model counts as collapsed below chance plus this share of the way from chance to a
# perfect accuracy (metrics.collapse_margin): ten classes give 0.1 + 0.25 × 0.9 = 0.325.
DEFAULT_COLLAPSE_MARGIN = 0.25


def collapse_threshold(num_classes: int, margin: float = DEFAULT_COLLAPSE_MARGIN) -> float:
    """The accuracy below which a K-class model has collapsed: 1/K + margin·(1 − 1/K).

    A model that recovers less than ``margin`` of the distance from guessing to perfect
    has learnt too little for its calibration to mean anything (a confidence near 1/K
    at an accuracy near 1/K is "calibrated" without being a result).
    """
    if not 0 <= margin < 1:
        raise UserError(f"metrics.collapse_margin must be in [0, 1), got {margin}")
    chance = 1.0 / num_classes
    return chance + margin * (1.0 - chance)


def scores(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, float | int]:
    """All metrics at once, keyed by :data:`METRIC_NAMES` (``accuracy, ece, mce, ada_ece,
    classwise_ece, oe, nll, brier``) in that order, then ``n``, the number of samples.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks" (ECE, MCE);
    Nguyen & O'Connor (2015) and Mukhoti et al. (2020), "Calibrating Deep Neural Networks
    using Focal Loss" (AdaECE); Kull et al. (2019), "Beyond temperature scaling" and
    Nixon et al. (2019), "Measuring Calibration in Deep Learning" (classwise ECE, their
    SCE); Thulasidasan et al. (2019), "On Mixup Training" (OE).
    """
    # Convert once so that torch inputs are not copied off the device for every metric.
    p, y = _validate(probs, labels, n_bins)
    return {**{name: metric(p, y, n_bins) for name, metric in _METRICS.items()}, "n": int(len(y))}


def pool_bins(bins: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """Bin tables of several runs or blocks added up (counts add, means weight by count),
    with the ECE and MCE of the pooled samples: what one table over all of them gives.

    ``bins`` holds rows of :func:`bin_stats` (``bin, lo, hi, count, conf, acc``).
    """
    weighted = bins.assign(conf_sum=bins["conf"].fillna(0) * bins["count"],
                           acc_sum=bins["acc"].fillna(0) * bins["count"])
    pooled = weighted.groupby(["bin", "lo", "hi"], as_index=False)[["count", "conf_sum", "acc_sum"]].sum()
    count = pooled["count"].where(pooled["count"] > 0)
    pooled = pooled.assign(conf=pooled["conf_sum"] / count, acc=pooled["acc_sum"] / count)
    gaps = (pooled["acc"] - pooled["conf"]).abs()
    ece_value = float((gaps.fillna(0) * pooled["count"]).sum() / max(pooled["count"].sum(), 1))
    mce_value = float(gaps.max(skipna=True)) if gaps.notna().any() else 0.0
    return pooled[["bin", "lo", "hi", "count", "conf", "acc"]], ece_value, mce_value
