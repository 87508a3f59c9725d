"""Evaluation metrics: numpy arrays (or torch tensors) in, floats and pandas DataFrames out.

Labels are 1 / 0 / NaN with NaN = unknown, masked per label; undefined metrics are NaN rather than errors.
"""

from __future__ import annotations

from loupe.core.metrics._arrays import MetricInputError
from loupe.core.metrics.bootstrap import (
    BootstrapCI,
    bootstrap_ci,
    paired_macro_auroc_difference,
    per_label_auroc_ci,
    percentile_interval,
    resample_counts,
    weighted_auroc,
)
from loupe.core.metrics.calibration import expected_calibration_error, reliability_plot, reliability_table
from loupe.core.metrics.classification import (
    auroc,
    average_precision,
    eer,
    macro_auroc,
    macro_average_precision,
    macro_mean,
    per_label_auroc,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
    threshold_metrics,
    youden_threshold,
)
from loupe.core.metrics.pixel import best_threshold_f1, mean_pixel_scores, pixel_f1_iou, pixel_scores
from loupe.core.metrics.subgroups import age_band, subgroup_table

__all__ = [
    "BootstrapCI",
    "MetricInputError",
    "age_band",
    "auroc",
    "average_precision",
    "best_threshold_f1",
    "bootstrap_ci",
    "paired_macro_auroc_difference",
    "eer",
    "expected_calibration_error",
    "macro_auroc",
    "macro_average_precision",
    "macro_mean",
    "mean_pixel_scores",
    "per_label_auroc",
    "per_label_auroc_ci",
    "percentile_interval",
    "pixel_f1_iou",
    "pixel_scores",
    "reliability_plot",
    "reliability_table",
    "resample_counts",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "subgroup_table",
    "threshold_for_sensitivity",
    "threshold_metrics",
    "weighted_auroc",
    "youden_threshold",
]
