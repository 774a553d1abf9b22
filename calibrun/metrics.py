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

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, Union, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from scipy import sparse, special, stats

from calibrun import UserError
from calibrun.smooth import smooth_ece_weighted

# What the metrics read: a tensor, or anything np.asarray reads (arrays, nested lists).
ArrayLike = Union[npt.ArrayLike, torch.Tensor]

# Rows of a probability matrix sum to 1 up to float32 rounding; a larger deviation
# almost always means logits were passed by mistake.
_SUM_TOLERANCE = 1e-3
# Keeps the NLL finite when the true class was given probability 0.
_NLL_EPS = 1e-12
_T = TypeVar("_T")


# A dataclass, not a NamedTuple: a field named count would shadow tuple.count.
@dataclass(frozen=True)
class Bins:
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


def wilson_interval(hits: np.ndarray, count: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of each bin's accuracy ``hits / count`` at ``level`` (NaN
    for an empty bin); ``hits`` are rounded to whole samples.

    References: Wilson (1927), "Probable inference, the law of succession, and statistical
    inference"; Brown, Cai & DasGupta (2001), "Interval Estimation for a Binomial
    Proportion" (why Wilson's rather than the normal approximation on small bins).
    """
    lo, hi = np.full(len(count), np.nan), np.full(len(count), np.nan)
    hits = np.rint(np.asarray(hits, dtype=np.float64)).astype(np.int64)
    for m, (k, n) in enumerate(zip(hits, np.asarray(count, dtype=np.int64))):
        if n > 0:
            ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
            lo[m], hi[m] = ci.low, ci.high
    return lo, hi


def bin_stats(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15, level: float = 0.95) -> pd.DataFrame:
    """Top-label reliability table over ``n_bins`` equal-width bins.

    Columns: ``bin`` (1..M), ``lo``, ``hi`` (bin edges), ``count`` (int), ``conf`` and
    ``acc`` (mean confidence and accuracy of the bin, NaN for an empty bin), ``acc_lo``
    and ``acc_hi`` (the Wilson interval of the bin's accuracy at ``level``).

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    bins = equal_width_bins(*_top_label(p, y), n_bins)
    edges = _bin_edges(n_bins)
    acc_lo, acc_hi = wilson_interval(np.nan_to_num(bins.acc) * bins.count, bins.count, level)
    return pd.DataFrame(
        {
            "bin": np.arange(1, n_bins + 1),
            "lo": edges[:-1],
            "hi": edges[1:],
            "count": bins.count.astype(np.int64),
            "conf": bins.conf,
            "acc": bins.acc,
            "acc_lo": acc_lo,
            "acc_hi": acc_hi,
        }
    )


# --------------------------------------------------------------------------- weighted forms
# Every metric below is computed for a batch of sample weights at once: ``w`` (B × n) holds
# one row per weighting of the n samples: ones for the sample itself (:func:`_once`),
# multinomial counts for a bootstrap resample (``calibrun.bootstrap``), which gives the
# metric of the resampled images without resampling them. Sums over bins become sparse
# products, so a thousand resamples cost a few passes over the data.


def _once(n: int) -> np.ndarray:
    """The weights of the sample itself: every sample counted once."""
    return np.ones((1, n))


def _sums_matrix(n: int, sample: np.ndarray, group: np.ndarray, values: np.ndarray, n_groups: int) -> sparse.csr_matrix:
    """The sparse (n_groups·c) × n matrix whose product with the weights (n × B) sums
    ``values[e, c]`` over the entries e of each group g, each entry weighted by its sample
    ``sample[e]`` (an entry per sample for top-label bins, per sample and class for
    classwise ones). It depends on the samples only, so resamples reuse it."""
    c = values.shape[1]
    cols = (group[:, None] * c + np.arange(c)).ravel()
    return sparse.csr_matrix((values.ravel(), (cols, np.repeat(sample, c))), shape=(n_groups * c, n))


def _weighted_sums(columns: np.ndarray, matrix: sparse.csr_matrix, n_groups: int) -> np.ndarray:
    """:func:`_sums_matrix`'s sums under the weights ``columns`` (n × B): (B, n_groups, c)."""
    return np.asarray(matrix @ columns).T.reshape(columns.shape[1], n_groups, -1)


class _ClasswiseLayout(NamedTuple):
    """What classwise ECE needs of the samples alone, computed once for all resamples:
    each class's most populated bin, the sums matrix of the (sample, class) pairs outside
    it, and the labels as a sparse one-hot matrix."""

    dominant: np.ndarray
    outside: sparse.csr_matrix
    onehot: sparse.csr_matrix

    @classmethod
    def of(cls, p: np.ndarray, y: np.ndarray, n_bins: int) -> _ClasswiseLayout:
        n, k = p.shape
        index = equal_width_index(p, n_bins)
        offset = n_bins * np.arange(k)
        # Most (sample, class) pairs sit in one bin per class (p_ik near 0): that bin's sums are
        # the class's totals (two dense products) minus the other bins' (a sparse one).
        dominant = np.bincount((index + offset).ravel(), minlength=k * n_bins).reshape(k, n_bins).argmax(axis=1)
        rows, cols = np.nonzero(index != dominant)
        hits = (y[rows] == cols).astype(np.float64)
        outside = _sums_matrix(n, rows, index[rows, cols] + offset[cols], np.column_stack([p[rows, cols], hits]),
                               k * n_bins)
        onehot = sparse.csr_matrix((np.ones(n), (y, np.arange(n))), shape=(k, n))
        return cls(dominant, outside, onehot)


@dataclass(frozen=True)
class _SortedPrefix:
    """Top-label confidences in ascending order and, per row of the weights, running sums
    over them of the weight (``count``), weighted confidence and weighted hits (B × n)."""

    conf: np.ndarray
    hit: np.ndarray
    count: np.ndarray
    conf_sum: np.ndarray
    hit_sum: np.ndarray


class Weighted:
    """Validated probabilities ``p`` (N × K) and labels ``y`` under the sample weights
    ``w`` (B × n), with the bins of ``n_bins``; keeps what several metrics share."""

    def __init__(self, p: np.ndarray, y: np.ndarray, n_bins: int, w: np.ndarray, shared: dict | None = None):
        self.p, self.y, self.n_bins, self.w = p, y, n_bins, w
        self.total = w.sum(axis=1)
        # What depends on the samples only (not on w), kept across the chunks of resamples.
        self.shared = {} if shared is None else shared

    def _shared(self, name: str, build: Callable[[], _T]) -> _T:
        if name not in self.shared:
            self.shared[name] = build()
        # Each name is only ever built by the same ``build``, so it holds that type.
        return cast(_T, self.shared[name])

    @functools.cached_property
    def columns(self) -> np.ndarray:
        """The weights as a C-ordered n × B array: what sparse products take without a copy."""
        return np.ascontiguousarray(self.w.T)

    @functools.cached_property
    def top_label(self) -> tuple[np.ndarray, np.ndarray]:
        return _top_label(self.p, self.y)

    @functools.cached_property
    def top_label_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted count, confidence sum and hit sum of each equal-width bin, each (B, M)."""
        def build() -> sparse.csr_matrix:
            conf, hit = self.top_label
            n = len(conf)
            return _sums_matrix(n, np.arange(n), equal_width_index(conf, self.n_bins),
                                np.column_stack([np.ones(n), conf, hit]), self.n_bins)

        sums = _weighted_sums(self.columns, self._shared("top_label_bins", build), self.n_bins)
        return sums[..., 0], sums[..., 1], sums[..., 2]

    @functools.cached_property
    def classwise(self) -> _ClasswiseLayout:
        return self._shared("classwise", lambda: _ClasswiseLayout.of(self.p, self.y, self.n_bins))

    @functools.cached_property
    def selective_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each block of equal top-label confidence, most confident first: its weight,
        its weighted errors, and the weight and errors of the blocks before it (each B × blocks)."""
        def build() -> tuple[np.ndarray, np.ndarray]:
            conf = self.top_label[0]
            order = np.argsort(-conf, kind="stable")
            return order, np.flatnonzero(np.r_[True, conf[order][1:] != conf[order][:-1]])

        order, starts = self._shared("selective_blocks", build)
        w = np.take(self.w, order, axis=1)
        weight = np.add.reduceat(w, starts, axis=1)
        errors = np.add.reduceat(w * (1.0 - self.top_label[1][order]), starts, axis=1)
        return weight, errors, np.cumsum(weight, axis=1) - weight, np.cumsum(errors, axis=1) - errors

    @functools.cached_property
    def sorted_prefix(self) -> _SortedPrefix:
        conf, hit = self.top_label
        # Stable: ties keep the samples' order, as an argsort of the resampled images would.
        order = np.argsort(conf, kind="stable")
        # np.take keeps the rows C-ordered (w[:, order] is F-ordered, and slower to sum along).
        conf, hit, w = conf[order], hit[order], np.take(self.w, order, axis=1)
        return _SortedPrefix(conf, hit, np.cumsum(w, axis=1), np.cumsum(w * conf, axis=1), np.cumsum(w * hit, axis=1))


def _ece_weighted(s: Weighted) -> np.ndarray:
    # |B_m|/n · |acc − conf| = |Σ hit − Σ conf| / n: no division by a bin's count.
    _, conf, hit = s.top_label_bins
    return np.abs(hit - conf).sum(axis=1) / s.total


def _mce_weighted(s: Weighted) -> np.ndarray:
    count, conf, hit = s.top_label_bins
    gap = np.divide(np.abs(hit - conf), count, out=np.zeros_like(count), where=count > 0)
    return gap.max(axis=1)


def _oe_weighted(s: Weighted) -> np.ndarray:
    count, conf, hit = s.top_label_bins
    over = np.divide(conf * np.maximum(conf - hit, 0.0), count, out=np.zeros_like(count), where=count > 0)
    return over.sum(axis=1) / s.total


def _classwise_ece_weighted(s: Weighted) -> np.ndarray:
    p, n_bins, w, layout = s.p, s.n_bins, s.w, s.classwise
    k = p.shape[1]
    sums = _weighted_sums(s.columns, layout.outside, k * n_bins).reshape(len(w), k, n_bins, 2)
    totals = np.stack([w @ p, np.asarray(layout.onehot @ s.columns).T], axis=-1)
    sums[:, np.arange(k), layout.dominant] = totals - sums.sum(axis=2)
    per_class = np.abs(sums[..., 1] - sums[..., 0]).sum(axis=2) / s.total[:, None]
    return per_class.mean(axis=1)


def _item_at(count: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Per row, the sorted sample whose copies hold 0-based ``position`` (B, m) of the
    row's sequence in which sample i appears ``w[b, i]`` times."""
    rows, n = count.shape
    # One search over all rows: offsetting row b by b·(total + 1) keeps the whole array sorted.
    offset = (np.arange(rows) * (count[:, -1].max() + 1))[:, None]
    found = np.searchsorted((count + offset).ravel(), (position + offset).ravel(), side="right")
    return found.reshape(position.shape) - (np.arange(rows) * n)[:, None]


def _prefix_up_to(prefix: _SortedPrefix, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of confidence and hits over the first ``position`` (B, m) elements of each
    row's sequence, a sample's copies split where a position falls among them."""
    n = prefix.count.shape[1]
    item = _item_at(prefix.count, position)
    before = np.clip(item - 1, 0, n - 1)
    counted = np.where(item > 0, np.take_along_axis(prefix.count, before, axis=1), 0.0)
    partial = np.where(item < n, position - counted, 0.0)
    inside = np.clip(item, 0, n - 1)
    return tuple(np.where(item > 0, np.take_along_axis(total, before, axis=1), 0.0) + partial * values[inside]
                 for total, values in ((prefix.conf_sum, prefix.conf), (prefix.hit_sum, prefix.hit)))


def _equal_mass_starts(total: np.ndarray, n_bins: int) -> np.ndarray:
    """Where each of ``n_bins`` groups starts in sequences of ``total`` elements (B, M+1),
    as np.array_split cuts them: the first total % M groups one element longer."""
    size, longer = np.divmod(total.astype(np.int64), n_bins)
    j = np.arange(n_bins + 1)
    return (j * size[:, None] + np.minimum(j, longer[:, None])).astype(np.float64)


def _adaptive_ece_weighted(s: Weighted) -> np.ndarray:
    prefix = s.sorted_prefix
    conf, hit = _prefix_up_to(prefix, _equal_mass_starts(s.total, s.n_bins))
    return np.abs(np.diff(hit, axis=1) - np.diff(conf, axis=1)).sum(axis=1) / s.total


def _equal_mass_value_bins(s: Weighted) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted count, confidence sum and hit sum of Kumar et al.'s bins, each (B, M):
    equal-mass groups, each boundary halfway between a group's last confidence and the
    next one's first, a confidence on a boundary in the lower bin (so tied confidences
    share a bin); as many bins as samples at most."""
    prefix, total = s.sorted_prefix, s.total
    n = len(prefix.conf)
    bins = int(min(s.n_bins, total.min()))
    starts = _equal_mass_starts(total, bins)[:, 1:-1]
    last, first = _item_at(prefix.count, starts - 1), _item_at(prefix.count, starts)
    boundaries = (prefix.conf[last] + prefix.conf[first]) / 2
    rows = len(total)
    ends = np.concatenate([np.zeros((rows, 1), np.int64), np.searchsorted(prefix.conf, boundaries, side="right"),
                           np.full((rows, 1), n)], axis=1)

    def per_bin(running: np.ndarray) -> np.ndarray:
        at = np.where(ends > 0, np.take_along_axis(running, np.clip(ends - 1, 0, n - 1), axis=1), 0.0)
        return np.diff(at, axis=1)

    return per_bin(prefix.count), per_bin(prefix.conf_sum), per_bin(prefix.hit_sum)


def _debiased_squared(s: Weighted) -> np.ndarray:
    """Kumar et al.'s estimate of the binned squared ℓ2 error, before the root (may be < 0)."""
    count, conf, hit = _equal_mass_value_bins(s)
    enough = count >= 2
    safe = np.where(enough, count, 2.0)
    accuracy = hit / safe
    # The plug-in squared gap minus its expected excess, the variance of a bin's accuracy.
    corrected = (conf / safe - accuracy) ** 2 - accuracy * (1 - accuracy) / (safe - 1)
    return np.where(enough, count * corrected, 0.0).sum(axis=1) / s.total


def _debiased_l2_weighted(s: Weighted) -> np.ndarray:
    return np.sqrt(np.maximum(_debiased_squared(s), 0.0))


def _plugin_l2_weighted(s: Weighted) -> np.ndarray:
    """The plug-in ℓ2 error over the same bins: what the debiased estimator estimates when
    the samples themselves are the population, as they are for a bootstrap resample."""
    count, conf, hit = _equal_mass_value_bins(s)
    gap = np.divide((conf - hit) ** 2, count, out=np.zeros_like(count), where=count > 0)
    return np.sqrt(gap.sum(axis=1) / s.total)


def _accuracy_weighted(s: Weighted) -> np.ndarray:
    return s.w @ s.top_label[1] / s.total


def _nll_weighted(s: Weighted) -> np.ndarray:
    return s.w @ -np.log(np.clip(s.p[np.arange(len(s.y)), s.y], _NLL_EPS, None)) / s.total


def _brier_weighted(s: Weighted) -> np.ndarray:
    def per_sample() -> np.ndarray:
        # Σ_k (p_k − [k = y])² = Σ_k p_k² − 2 p_y + 1, without an N × K one-hot array.
        return np.einsum("ij,ij->i", s.p, s.p) - 2 * s.p[np.arange(len(s.y)), s.y] + 1

    return s.w @ s._shared("brier", per_sample) / s.total


def _harmonic_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H_b − H_a = Σ_{j=a+1..b} 1/j, for counts (or sums of count weights) a ≤ b."""
    return special.digamma(b + 1.0) - special.digamma(a + 1.0)


def _aurc_weighted(s: Weighted) -> np.ndarray:
    # The selective risk at position j of the copies ordered by confidence is E_j / j, with
    # a tied block's errors spread evenly over its positions: over a block of weight W after
    # a copies and E errors, Σ_j (E + (j − a)·r)/j = (E − a·r)·(H_{a+W} − H_a) + W·r.
    weight, errors, before, errors_before = s.selective_blocks
    rate = np.divide(errors, weight, out=np.zeros_like(errors), where=weight > 0)
    harmonic = _harmonic_between(before, before + weight)
    return ((errors_before - before * rate) * harmonic + errors).sum(axis=1) / s.total


def _eaurc_weighted(s: Weighted) -> np.ndarray:
    # The optimum ranks every correct copy first: Σ_{k>C} (k − C)/k = (N − C) − C·(H_N − H_C).
    correct = s.w @ s.top_label[1]
    optimal = (s.total - correct) - correct * _harmonic_between(correct, s.total)
    return _aurc_weighted(s) - optimal / s.total


def _augrc_weighted(s: Weighted) -> np.ndarray:
    # The generalized risk at position j is E_j / N; over a block, Σ_j E_j = W·E + r·W(W + 1)/2.
    weight, errors, _, errors_before = s.selective_blocks
    rate = np.divide(errors, weight, out=np.zeros_like(errors), where=weight > 0)
    return (weight * errors_before + rate * weight * (weight + 1) / 2).sum(axis=1) / s.total ** 2


def _smooth_ece_weighted(s: Weighted) -> np.ndarray:
    return smooth_ece_weighted(*s.top_label, s.w, single=len(s.w) > 1, columns=s.columns)


# --------------------------------------------------------------------------- the metrics


def accuracy(probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    p, y = _validate(probs, labels)
    return float(_accuracy_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error: sum_m |B_m|/n * |acc(B_m) - conf(B_m)|.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    return float(_ece_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


def mce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Maximum calibration error: max over non-empty bins of |acc(B_m) - conf(B_m)|.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    return float(_mce_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


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
    return float(_adaptive_ece_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Classwise ECE: mean over classes k of the one-vs-rest ECE of p_ik against
    [y_i == k], each over ``n_bins`` equal-width bins of p_ik.

    References: Kull et al. (2019), "Beyond temperature scaling: Obtaining well-calibrated
    multiclass probabilities with Dirichlet calibration" (classwise-ECE); Nixon et al.
    (2019), "Measuring Calibration in Deep Learning" (the same quantity as SCE, the static
    calibration error).
    """
    p, y = _validate(probs, labels, n_bins)
    return float(_classwise_ece_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


def overconfidence_error(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Overconfidence error: sum_m |B_m|/n * conf(B_m) * max(conf(B_m) - acc(B_m), 0).

    References: Thulasidasan et al. (2019), "On Mixup Training: Improved Calibration and
    Predictive Uncertainty for Deep Neural Networks".
    """
    p, y = _validate(probs, labels, n_bins)
    return float(_oe_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


def debiased_l2_ce(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float:
    """Debiased top-label ℓ2 calibration error over ``n_bins`` equal-mass bins:
    sqrt(max(Σ_m |B_m|/n · [(conf(B_m) − acc(B_m))² − acc(B_m)(1 − acc(B_m))/(|B_m| − 1)], 0)).

    The plug-in squared gap of a bin overestimates the true one by the variance of the
    bin's accuracy; subtracting its estimate makes the sum, given the confidences (which
    alone place the bins), unbiased for the binned squared ℓ2 error up to the spread of
    the true probabilities within a bin, which pulls it slightly below 0 on a calibrated
    model (bins of fewer than two samples count 0). The square root, clipped at 0, is then
    biased upwards near 0, far less than the plug-in error (tests/test_bootstrap.py
    measures both on a calibrated model). The bins are those of the authors' code
    (``calibration.get_top_calibration_error``):
    equal-mass groups of the sorted confidences with each boundary halfway between two
    groups, so that tied confidences share a bin.

    References: Kumar, Liang & Ma (2019), "Verified Uncertainty Calibration", §4 (the
    debiased estimator of Bröcker 2012 and Ferro & Fricker 2012).
    """
    p, y = _validate(probs, labels, n_bins)
    return float(_debiased_l2_weighted(Weighted(p, y, n_bins, _once(len(y))))[0])


def smooth_ece(probs: ArrayLike, labels: ArrayLike) -> float:
    """Smooth ECE of the top-label confidence: the residuals conf − correct smoothed
    with a Gaussian kernel reflected at 0 and 1, at the bandwidth σ* where smECE equals σ
    (no bins). Equal to relplot's ``smECE`` (its default kernel) to rounding.

    References: Błasiok & Nakkiran (2023), "Smooth ECE: Principled Reliability Diagrams
    via Kernel Smoothing" (``calibrun.smooth``).
    """
    p, y = _validate(probs, labels)
    return float(_smooth_ece_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def aurc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Area under the risk–coverage curve of the top-label confidence, (1/n)·Σ_k E_k/k with
    E_k the errors among the k most confident samples (a tied block's errors spread evenly
    over its positions). Lower is better.

    References: Geifman, Uziel & El-Yaniv (2019), "Bias-Reduced Uncertainty Estimation for
    Deep Neural Classifiers", §3.
    """
    p, y = _validate(probs, labels)
    return float(_aurc_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def excess_aurc(probs: ArrayLike, labels: ArrayLike) -> float:
    """E-AURC: AURC minus the AURC of a confidence that ranks every correct sample first,
    (1/n)·Σ_{k>C} (k − C)/k at C correct (Geifman et al.'s r + (1 − r)·ln(1 − r) is its
    large-n limit). References: Geifman, Uziel & El-Yaniv (2019), §3.
    """
    p, y = _validate(probs, labels)
    return float(_eaurc_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def augrc(probs: ArrayLike, labels: ArrayLike) -> float:
    """Area under the generalized risk–coverage curve, (1/n)·Σ_k E_k/n: the share of
    samples both answered and wrong, averaged over coverage. Lower is better.

    References: Traub et al. (2024), "Overcoming Common Flaws in the Evaluation of
    Selective Classification Systems".
    """
    p, y = _validate(probs, labels)
    return float(_augrc_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def nll(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class, with p clipped at 1e-12."""
    p, y = _validate(probs, labels)
    return float(_nll_weighted(Weighted(p, y, 1, _once(len(y))))[0])


def brier(probs: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Brier score: mean over samples of sum_k (p_ik - [k == y_i])^2."""
    p, y = _validate(probs, labels)
    return float(_brier_weighted(Weighted(p, y, 1, _once(len(y))))[0])


class Metric(NamedTuple):
    """A metric of :func:`scores`: ``weighted(sample)`` gives its value under each row of
    the sample weights of a :class:`Weighted` sample; ``higher_is_better`` says which
    way an improvement goes; ``header`` is what a table's legend says it is; ``bounds``
    the range of its values (where intervals are clipped). ``population``, if given, is
    what the metric estimates when the samples are the whole population, as they are for
    their bootstrap resamples (``calibrun.bootstrap``'s basic interval reflects around
    it); without it the metric is its own plug-in value."""

    weighted: Callable[[Weighted], np.ndarray]
    header: str
    higher_is_better: bool = False
    bounds: tuple[float, float] = (0.0, np.inf)
    population: Callable[[Weighted], np.ndarray] | None = None


# The metrics of ``scores`` in the column order of metrics.csv and the sweep reports.
_METRICS: dict[str, Metric] = {
    "accuracy": Metric(_accuracy_weighted, "top-1 accuracy", higher_is_better=True, bounds=(0.0, 1.0)),
    "ece": Metric(_ece_weighted, "ECE, equal-width bins (Guo et al. 2017)"),
    "mce": Metric(_mce_weighted, "MCE, equal-width bins (Guo et al. 2017)"),
    "ada_ece": Metric(_adaptive_ece_weighted, "adaptive ECE, equal-mass bins (Mukhoti et al. 2020)"),
    "classwise_ece": Metric(_classwise_ece_weighted, "classwise ECE (Kull et al. 2019)"),
    "oe": Metric(_oe_weighted, "overconfidence error (Thulasidasan et al. 2019)"),
    "debiased_l2_ce": Metric(_debiased_l2_weighted,
                             "debiased ℓ2 calibration error, equal-mass bins (Kumar et al. 2019)",
                             population=_plugin_l2_weighted),
    "smooth_ece": Metric(_smooth_ece_weighted,
                         "smooth ECE, reflected Gaussian kernel at σ* = smECE (Błasiok & Nakkiran 2023)"),
    "nll": Metric(_nll_weighted, "negative log-likelihood"),
    "brier": Metric(_brier_weighted, "multi-class Brier score"),
    "aurc": Metric(_aurc_weighted, "AURC, area under the risk–coverage curve (Geifman et al. 2019)",
                   bounds=(0.0, 1.0)),
    "eaurc": Metric(_eaurc_weighted, "E-AURC, AURC minus its optimum at the same accuracy (Geifman et al. 2019)",
                    bounds=(0.0, 1.0)),
    "augrc": Metric(_augrc_weighted, "AUGRC, area under the generalized risk–coverage curve (Traub et al. 2024)",
                    bounds=(0.0, 1.0)),
}
METRIC_NAMES: tuple[str, ...] = tuple(_METRICS)


def metric(name: str) -> Metric:
    """The :class:`Metric` behind the ``name`` column."""
    return _METRICS[name]


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
    classwise_ece, oe, debiased_l2_ce, smooth_ece, nll, brier, aurc, eaurc, augrc``) in that order, then ``n``,
    the number of samples. ``calibrun.bootstrap.scores_with_intervals`` adds intervals.

    References: Guo et al. (2017), "On Calibration of Modern Neural Networks" (ECE, MCE);
    Nguyen & O'Connor (2015) and Mukhoti et al. (2020), "Calibrating Deep Neural Networks
    using Focal Loss" (AdaECE); Kull et al. (2019), "Beyond temperature scaling" and
    Nixon et al. (2019), "Measuring Calibration in Deep Learning" (classwise ECE, their
    SCE); Thulasidasan et al. (2019), "On Mixup Training" (OE); Kumar, Liang & Ma (2019),
    "Verified Uncertainty Calibration" (debiased ℓ2); Błasiok & Nakkiran (2023), "Smooth
    ECE" (smooth ECE); Geifman, Uziel & El-Yaniv (2019) (AURC, E-AURC); Traub et al.
    (2024) (AUGRC).
    """
    # Convert once so that torch inputs are not copied off the device for every metric.
    p, y = _validate(probs, labels, n_bins)
    values = weighted_scores(p, y, n_bins, _once(len(y)))[:, 0]
    return {**{name: float(value) for name, value in zip(METRIC_NAMES, values)}, "n": int(len(y))}


def population_scores(p: np.ndarray, y: np.ndarray, n_bins: int, point: np.ndarray) -> np.ndarray:
    """Each metric's value with the samples as the population (:attr:`Metric.population`),
    for validated ``p`` and ``y``, in :data:`METRIC_NAMES` order: ``point`` (the metrics'
    values on the sample) where a metric has no population form of its own."""
    sample = Weighted(p, y, n_bins, _once(len(y)))
    return np.array([entry.population(sample)[0] if entry.population else value
                     for entry, value in zip(_METRICS.values(), point)])


def weighted_scores(p: np.ndarray, y: np.ndarray, n_bins: int, w: np.ndarray, shared: dict | None = None) -> np.ndarray:
    """Every metric under each row of the sample weights ``w`` (B × n), for validated
    ``p`` and ``y``: (number of metrics, B), in :data:`METRIC_NAMES` order. ``shared``
    (one dict per ``p``, ``y``) keeps what does not depend on ``w`` across calls."""
    sample = Weighted(p, y, n_bins, w, shared)
    return np.stack([entry.weighted(sample) for entry in _METRICS.values()])


def validated(probs: ArrayLike, labels: ArrayLike, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` as float64 / int64 arrays, or ``ValueError`` saying what is wrong."""
    return _validate(probs, labels, n_bins)


def pool_bins(bins: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """Bin tables of several runs or blocks added up (counts add, means weight by count),
    with the ECE and MCE of the pooled samples: what one table over all of them gives.

    ``bins`` holds rows of :func:`bin_stats` (``bin, lo, hi, count, conf, acc``); the
    pooled table has the Wilson intervals of the pooled accuracies (``acc_lo, acc_hi``).
    """
    weighted = bins.assign(conf_sum=bins["conf"].fillna(0) * bins["count"],
                           acc_sum=bins["acc"].fillna(0) * bins["count"])
    pooled = weighted.groupby(["bin", "lo", "hi"], as_index=False)[["count", "conf_sum", "acc_sum"]].sum()
    count = pooled["count"].where(pooled["count"] > 0)
    pooled = pooled.assign(conf=pooled["conf_sum"] / count, acc=pooled["acc_sum"] / count)
    gaps = (pooled["acc"] - pooled["conf"]).abs()
    ece_value = float((gaps.fillna(0) * pooled["count"]).sum() / max(pooled["count"].sum(), 1))
    mce_value = float(gaps.max(skipna=True)) if gaps.notna().any() else 0.0
    pooled["acc_lo"], pooled["acc_hi"] = wilson_interval(pooled["acc_sum"].to_numpy(), pooled["count"].to_numpy())
    return pooled[["bin", "lo", "hi", "count", "conf", "acc", "acc_lo", "acc_hi"]], ece_value, mce_value
