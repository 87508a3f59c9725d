"""Binary and multi-label classification metrics with unknown (NaN) labels masked.

Conventions used throughout:
- ``y`` holds labels 1 / 0 / NaN; NaN means unknown and the sample is dropped for that label only.
- ``s`` holds scores on any monotone scale (probability or logit); higher means "more positive".
- A sample is called positive at threshold ``thr`` when ``s >= thr`` (the convention of ``sklearn.metrics.roc_curve``).
- A metric that is undefined on the data (one class only, no predicted positives, ...) is NaN, not an exception, so
  one rare label cannot break a whole evaluation table. Bad inputs (wrong shapes, labels other than 0/1/NaN, NaN
  scores on known labels) do raise :class:`MetricInputError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from loupe.core.metrics._arrays import (
    MetricInputError,
    as_2d,
    check_same_shape,
    label_names_for,
    masked_binary,
    nan_mean,
)

logger = logging.getLogger(__name__)

NAN = float("nan")


def _both_classes(y: np.ndarray, what: str) -> bool:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        logger.debug(
            "%s undefined: %d known labels, %d positive (needs both classes); returning NaN", what, y.size, n_pos
        )
        return False
    return True


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve for one label, ties counted half; NaN labels masked.

    Args:
        y: labels (N,), 1 / 0 / NaN.
        s: scores (N,).

    Returns:
        AUROC in [0, 1], or NaN when the known labels hold only one class.
    """
    y, s = masked_binary(y, s)
    if not _both_classes(y, "AUROC"):
        return NAN
    return float(roc_auc_score(y, s))


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve, as sklearn) for one label; NaN masked.

    Returns NaN when the known labels hold only one class (AP is also uninformative with no positives).
    """
    y, s = masked_binary(y, s)
    if not _both_classes(y, "AP"):
        return NAN
    return float(average_precision_score(y, s))


def per_label_auroc(Y: np.ndarray, S: np.ndarray, label_names: Sequence[str] | None = None) -> pd.DataFrame:
    """AUROC and AP for every label column of a multi-label problem.

    Args:
        Y: labels (N, L), 1 / 0 / NaN.
        S: scores (N, L).
        label_names: L names; default ``label_0 ...``.

    Returns:
        One row per label: ``label``, ``n`` (known labels), ``n_pos``, ``auroc``, ``ap`` (NaN when undefined).
        Use :func:`macro_mean` on a column for the macro average.
    """
    Y, S = as_2d(Y, "Y"), as_2d(S, "S")
    check_same_shape(Y, S, "Y", "S")
    names = label_names_for(Y.shape[1], label_names)
    rows = []
    for j, name in enumerate(names):
        known = ~np.isnan(Y[:, j])
        rows.append(
            {
                "label": name,
                "n": int(known.sum()),
                "n_pos": int(np.nansum(Y[:, j])),
                "auroc": auroc(Y[:, j], S[:, j]),
                "ap": average_precision(Y[:, j], S[:, j]),
            }
        )
    return pd.DataFrame(rows, columns=["label", "n", "n_pos", "auroc", "ap"])


def macro_mean(values: Sequence[float] | np.ndarray | pd.Series) -> float:
    """Unweighted mean over labels, ignoring labels whose metric is NaN; NaN when all are NaN."""
    return nan_mean(values)


def macro_auroc(Y: np.ndarray, S: np.ndarray) -> float:
    """Mean AUROC over the label columns of (N, L) arrays where it is defined."""
    return macro_mean(per_label_auroc(Y, S)["auroc"])


def macro_average_precision(Y: np.ndarray, S: np.ndarray) -> float:
    """Mean AP over the label columns of (N, L) arrays where it is defined."""
    return macro_mean(per_label_auroc(Y, S)["ap"])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else NAN


def threshold_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion-matrix metrics when ``s >= threshold`` is called positive; NaN labels masked.

    Returns:
        ``tp``, ``fp``, ``tn``, ``fn`` (counts) and ``accuracy``, ``sensitivity`` (recall, TPR), ``specificity``
        (TNR), ``precision`` (PPV), ``f1``; a ratio with a zero denominator is NaN (e.g. precision when nothing is
        called positive, F1 when there are neither positives nor positive calls).
    """
    y, s = masked_binary(y, s)
    pred = s >= threshold
    pos = y == 1
    tp, fp = int((pred & pos).sum()), int((pred & ~pos).sum())
    fn, tn = int((~pred & pos).sum()), int((~pred & ~pos).sum())
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _roc(y: np.ndarray, s: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """All ROC operating points (no intermediate points dropped), or None when undefined."""
    y, s = masked_binary(y, s)
    if not _both_classes(y, what):
        return None
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def _check_rate(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise MetricInputError(f"{name} must be a rate in [0, 1], got {value}")


_EPS = 1e-12  # rates like 1 - 0.1 must still count as reaching 0.9


def sensitivity_at_specificity(y: np.ndarray, s: np.ndarray, specificity: float) -> float:
    """Highest sensitivity among thresholds whose specificity is at least ``specificity`` (0..1); NaN if undefined."""
    _check_rate(specificity, "specificity")
    roc = _roc(y, s, "sensitivity at specificity")
    if roc is None:
        return NAN
    fpr, tpr, _ = roc
    ok = 1.0 - fpr >= specificity - _EPS
    return float(tpr[ok].max())  # the "nothing positive" point always has specificity 1


def specificity_at_sensitivity(y: np.ndarray, s: np.ndarray, sensitivity: float) -> float:
    """Highest specificity among thresholds whose sensitivity is at least ``sensitivity`` (0..1); NaN if undefined."""
    _check_rate(sensitivity, "sensitivity")
    roc = _roc(y, s, "specificity at sensitivity")
    if roc is None:
        return NAN
    fpr, tpr, _ = roc
    ok = tpr >= sensitivity - _EPS
    return float((1.0 - fpr[ok]).max())  # the "everything positive" point always has sensitivity 1


def youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (pick it on validation data).

    Ties go to the highest threshold (fewest positive calls). NaN when the labels hold one class only.
    The returned value is a score from ``s``, so ``s >= threshold`` reproduces the operating point.
    """
    roc = _roc(y, s, "Youden threshold")
    if roc is None:
        return NAN
    fpr, tpr, thr = roc
    j = tpr - fpr
    j[0] = -np.inf  # the point at +inf (nothing positive) is never a usable operating threshold
    return float(thr[int(np.argmax(j))])


def threshold_for_sensitivity(y: np.ndarray, s: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity on (y, s) is at least ``target`` in (0, 1]; NaN if undefined.

    Chosen on validation data, it keeps the most specificity while meeting the sensitivity target there.
    """
    if not 0.0 < target <= 1.0:
        raise MetricInputError(f"target sensitivity must be in (0, 1], got {target}")
    roc = _roc(y, s, "threshold for sensitivity")
    if roc is None:
        return NAN
    _, tpr, thr = roc
    i = int(np.argmax(tpr >= target - _EPS))  # thresholds decrease along the curve: the first hit is the highest
    return float(thr[i])


def eer(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Equal error rate: the rate where false positive rate equals false negative rate (1 - TPR).

    The ROC curve is taken as piecewise linear between its operating points and the EER is where it crosses the
    line FPR = FNR (the same value as the common ``brentq(lambda x: 1 - x - interp1d(fpr, tpr)(x), 0, 1)``).
    The threshold returned is that of the operating point nearest the crossing (the later one on a tie), so it is a
    real score from ``s``.

    Returns:
        ``(eer, threshold)``, EER in [0, 1]; ``(nan, nan)`` when the labels hold one class only.
    """
    roc = _roc(y, s, "EER")
    if roc is None:
        return NAN, NAN
    fpr, tpr, thr = roc
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (nothing positive), ends at -1 (everything positive), non-increasing
    i = int(np.argmax(diff <= 0))
    if diff[i] == 0:
        return float(fpr[i]), float(thr[i])
    a, b = i - 1, i  # diff[a] > 0 > diff[b]
    t = diff[a] / (diff[a] - diff[b])
    rate = fpr[a] + t * (fpr[b] - fpr[a])
    nearest = a if abs(diff[a]) < abs(diff[b]) and a > 0 else b
    return float(rate), float(thr[nearest])


__all__ = [
    "MetricInputError",
    "auroc",
    "average_precision",
    "eer",
    "macro_auroc",
    "macro_average_precision",
    "macro_mean",
    "per_label_auroc",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "threshold_for_sensitivity",
    "threshold_metrics",
    "youden_threshold",
]
