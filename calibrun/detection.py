"""Out-of-distribution detection from softmax outputs: uncertainty scores and the
metrics that say how well a score separates in- from out-of-distribution inputs.

Scores are oriented so that a higher value means "more likely in-distribution", and
the in-distribution inputs are the positive class throughout (AUPR-in, TPR), as in
Hendrycks & Gimpel (2017). AUROC and the precision-recall areas come from
scikit-learn.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

# Columns of ``ood/metrics.csv`` after ``dataset``, ``score`` and ``calibrator``.
DETECTION_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def msp(probs: np.ndarray) -> np.ndarray:
    """Maximum softmax probability, max_k p_k (Hendrycks & Gimpel 2017)."""
    return probs.max(axis=1)


def neg_entropy(probs: np.ndarray) -> np.ndarray:
    """Σ_k p_k log p_k, the negative predictive entropy (0·log 0 = 0): higher is more certain."""
    p = np.clip(probs, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return terms.sum(axis=1)


# Each uncertainty score by the name used in the tables; ``entropy`` is ranked by its
# negative so that every score is "higher = in-distribution".
SCORES = {"msp": msp, "entropy": neg_entropy}


def fpr_at_tpr(score_in: np.ndarray, score_out: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of out-of-distribution inputs accepted at the highest threshold that
    accepts at least ``tpr`` of the in-distribution inputs (FPR at 95% TPR)."""
    y = np.r_[np.ones(len(score_in)), np.zeros(len(score_out))]
    fpr, true_pos, _ = roc_curve(y, np.r_[score_in, score_out], drop_intermediate=False)
    return float(fpr[np.searchsorted(true_pos, tpr, side="left")])


def detection_metrics(score_in: ArrayLike, score_out: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR with in-distribution as positive (``aupr_in``), AUPR with
    out-of-distribution as positive on the negated score (``aupr_out``), and FPR at 95% TPR.

    References: Hendrycks & Gimpel 2017, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", §3 (AUROC, AUPR-In/Out); Liang et
    al. 2018, "Enhancing the Reliability of Out-of-distribution Image Detection in Neural
    Networks" (FPR at 95% TPR).
    """
    s_in, s_out = np.asarray(score_in, dtype=np.float64), np.asarray(score_out, dtype=np.float64)
    if s_in.ndim != 1 or s_out.ndim != 1 or not len(s_in) or not len(s_out):
        raise ValueError("detection_metrics needs two non-empty 1-d score arrays")
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    scores = np.r_[s_in, s_out]
    return {
        "auroc": float(roc_auc_score(y, scores)),
        "aupr_in": float(average_precision_score(y, scores)),
        "aupr_out": float(average_precision_score(1 - y, -scores)),
        "fpr95": fpr_at_tpr(s_in, s_out),
    }
