"""Split conformal prediction sets: sets of labels that contain the true one with
probability at least 1 − α, whatever the model, if calibration and test samples are
exchangeable.

A score s(x, y) says how unusual label y is for x; its conformal quantile q̂ on a
calibration split of n samples is the ⌈(n + 1)(1 − α)⌉-th smallest score, and the set
of a test sample holds every label whose score is at most q̂. Then
1 − α ≤ P(y ∈ set) ≤ 1 − α + 1/(n + 1) (the upper bound for scores without ties, which
the randomised scores ensure). The calibration split must be disjoint from whatever
fitted the model or its calibrator.

Scores (``method``):

- ``lac``: 1 − p_y, the least ambiguous set-valued classifier (Sadinle, Lei and
  Wasserman 2019; THR in some papers).
- ``aps``: the probability mass of the labels ranked above y plus U·p_y, U ~ Uniform(0, 1)
  (adaptive prediction sets, Romano, Sesia and Candès 2020, randomised version).
- ``raps``: aps plus λ·max(0, rank(y) − k_reg), the rank 1-based (regularised adaptive
  prediction sets, Angelopoulos, Bates, Malik and Jordan 2021, Algorithm 1).

U is drawn once per sample from ``seed``, the same for every label of the sample, as in
the authors' code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from calibrun import UserError
from calibrun.config import CONFORMAL_METHODS as METHODS
from calibrun.metrics import validated
# Rows of N × K score arrays made at once when a run scores its sets: bounds the memory
# at 50,000 × 1,000 logits to a few arrays of this many elements.
_BLOCK_ELEMENTS = 1 << 20


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def label_scores(p: np.ndarray, method: str, u: np.ndarray, raps_lambda: float = 0.01,
                 raps_k_reg: int = 5) -> np.ndarray:
    """s(x, k) for every sample and label (N × K); ``u`` one uniform draw per sample."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed: {', '.join(METHODS)}")
    if method == "lac":
        return 1.0 - p
    rows = np.arange(len(p))[:, None]
    order = np.argsort(-p, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[rows, order] = np.arange(1, p.shape[1] + 1)
    above = np.take_along_axis(np.cumsum(np.take_along_axis(p, order, axis=1), axis=1), rank - 1, axis=1) - p
    scores = above + u[:, None] * p
    if method == "raps":
        scores = scores + raps_lambda * np.maximum(0, rank - raps_k_reg)
    return scores


def conformal_quantile(calibration_scores: np.ndarray, alpha: float) -> float:
    """The ⌈(n + 1)(1 − α)⌉-th smallest of the n calibration scores (the true labels')."""
    _check_alpha(alpha)
    n = len(calibration_scores)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # the tolerance keeps 0.9 × 10 at 9
    if rank > n:
        raise ValueError(f"a calibration split of {n} samples is too small for alpha={alpha}: "
                         f"it needs at least {math.ceil(1.0 / alpha - 1.0 - 1e-9)}")
    return float(np.sort(calibration_scores)[rank - 1])


def prediction_sets(calibration_probs: ArrayLike, calibration_labels: ArrayLike, test_probs: ArrayLike,
                    alpha: float = 0.1, method: str = "aps", seed: int = 0, raps_lambda: float = 0.01,
                    raps_k_reg: int = 5) -> tuple[np.ndarray, float]:
    """The test samples' prediction sets (N × K booleans) and the quantile q̂ they use."""
    _check_alpha(alpha)
    p_cal, y_cal = validated(calibration_probs, calibration_labels)
    p_test, _ = validated(test_probs, np.zeros(len(np.asarray(test_probs)), dtype=np.int64))
    rng = np.random.default_rng(seed)
    u_cal, u_test = rng.random(len(p_cal)), rng.random(len(p_test))
    cal = label_scores(p_cal, method, u_cal, raps_lambda, raps_k_reg)[np.arange(len(y_cal)), y_cal]
    q = conformal_quantile(cal, alpha)
    return label_scores(p_test, method, u_test, raps_lambda, raps_k_reg) <= q, q


def coverage_spread(n: int, alpha: float, level: float = 0.95) -> tuple[float, float]:
    """The range of coverages that ``level`` of the calibration draws of ``n`` samples give
    on an infinite test set: the coverage given the draw follows Beta(n + 1 − l, l),
    l = ⌊(n + 1)α⌋ (Vovk 2012, "Conditional validity of inductive conformal predictors";
    Angelopoulos & Bates 2021, "A Gentle Introduction to Conformal Prediction", §3.2)."""
    _check_alpha(alpha)
    rank = math.floor((n + 1) * alpha + 1e-9)
    if rank < 1:
        raise ValueError(f"a calibration split of {n} samples is too small for alpha={alpha}")
    lo, hi = stats.beta.ppf([(1 - level) / 2, (1 + level) / 2], n + 1 - rank, rank)
    return float(lo), float(hi)


def coverage(sets: np.ndarray, labels: ArrayLike) -> float:
    """The share of samples whose set holds their label."""
    y = np.asarray(labels)
    return float(sets[np.arange(len(y)), y].mean())


def mean_set_size(sets: np.ndarray) -> float:
    """The mean number of labels per set."""
    return float(sets.sum(axis=1).mean())


# --------------------------------------------------------------------------- in a run


@dataclass(frozen=True)
class Settings:
    """How a run makes its conformal sets (the ``metrics.conformal_*`` keys): miscoverage
    ``alpha``, the scores ``methods``, the ``share`` of the validation split held out from
    the calibrators for the quantile, the ``seed`` of that split and of the randomisation,
    and RAPS's λ and k_reg (Angelopoulos et al. 2021 tune them; these are their code's
    defaults for ImageNet-sized label sets, a user with few classes may want a smaller k_reg)."""

    alpha: float = 0.1
    methods: tuple[str, ...] = METHODS
    share: float = 0.5
    seed: int = 0
    raps_lambda: float = 0.01
    raps_k_reg: int = 5


def split_validation(n: int, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(indices that fit the calibrators, indices that calibrate the sets) of ``n``
    validation samples: a permutation drawn from ``settings.seed``, its first
    round(share·n) for the sets, the rest for the calibrators, each in ascending order."""
    held = int(round(settings.share * n))
    needed = math.ceil(1.0 / settings.alpha - 1.0 - 1e-9)
    if held < needed or held == n:
        raise UserError(f"metrics.conformal_share={settings.share:g} holds out {held} of the {n} validation images for "
                        f"the conformal sets: metrics.conformal_alpha={settings.alpha:g} needs at least {needed}, and "
                        "the calibrators need the rest to be non-empty.")
    order = np.random.default_rng(settings.seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def quantiles(probs: np.ndarray, labels: np.ndarray, settings: Settings) -> dict[str, float]:
    """Each method's conformal quantile q̂ on the held-out calibration samples."""
    u = np.random.default_rng([settings.seed, 0]).random(len(labels))
    rows = np.arange(len(labels))
    return {method: conformal_quantile(
        label_scores(probs, method, u, settings.raps_lambda, settings.raps_k_reg)[rows, labels], settings.alpha)
        for method in settings.methods}


def set_columns(probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float],
                settings: Settings) -> dict[str, float]:
    """``set_coverage_<method>`` and ``set_size_<method>`` of the sets at the quantiles
    ``thresholds`` on validated ``probs`` and ``labels`` (the randomisation seeded)."""
    u = np.random.default_rng([settings.seed, 1]).random(len(labels))
    step = max(1, _BLOCK_ELEMENTS // probs.shape[1])
    covered, sizes = {m: 0.0 for m in thresholds}, {m: 0.0 for m in thresholds}
    for start in range(0, len(labels), step):
        block = slice(start, start + step)
        for method, q in thresholds.items():
            sets = label_scores(probs[block], method, u[block], settings.raps_lambda, settings.raps_k_reg) <= q
            covered[method] += float(sets[np.arange(len(sets)), labels[block]].sum())
            sizes[method] += float(sets.sum())
    return {column: total / len(labels) for method in thresholds
            for column, total in ((f"set_coverage_{method}", covered[method]), (f"set_size_{method}", sizes[method]))}
