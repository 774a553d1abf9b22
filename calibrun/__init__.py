"""calibrun: an experiment runner for confidence calibration of image classifiers.

It is also a library for your own logits (docs/guide/own-logits.md): the metrics, the
calibrators and the figures are importable from here. They load on first use, so that
``import calibrun`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public API: each name and the module it lives in (loaded on first access).
# ``scores`` computes every metric at once, with bootstrap intervals on request.
_PUBLIC = {
    **dict.fromkeys(["accuracy", "ece", "mce", "adaptive_ece", "classwise_ece", "overconfidence_error",
                     "debiased_l2_ce", "smooth_ece", "nll", "brier", "bin_stats", "METRIC_NAMES"], "calibrun.metrics"),
    "scores": "calibrun.bootstrap",
    **dict.fromkeys(["aurc", "excess_aurc", "augrc"], "calibrun.metrics"),
    **dict.fromkeys(["risk_coverage", "selective_risk"], "calibrun.selective"),
    **dict.fromkeys(["prediction_sets", "coverage", "mean_set_size"], "calibrun.conformal"),
    **dict.fromkeys(["Calibrator", "Uncalibrated", "TemperatureScaling", "VectorScaling", "MatrixScaling",
                     "PlattScaling", "HistogramBinning", "IsotonicCalibration", "DirichletCalibration",
                     "EnsembleTemperatureScaling", "MixNMatch", "SplineCalibration", "BayesianBinningQuantiles"],
                    "calibrun.calibrators"),
    **dict.fromkeys(["reliability_diagram", "reliability_with_histogram", "reliability_grid",
                     "confidence_histogram"], "calibrun.plots"),
    "detection_metrics": "calibrun.detection",
    "load_calibrators": "calibrun.calibration",
}
__all__ = ["UserError", "__version__", *_PUBLIC]


class UserError(Exception):
    """A problem the user can fix (bad config, missing data, unreadable file).

    The command line prints its message without a traceback and exits with status 1.
    """


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'calibrun' has no attribute {name!r}")
