"""Pixel-level localisation metrics (forensics manipulation masks, segmentation): F1 and IoU per image.

Conventions:
- A pixel is predicted positive when its score is ``>= threshold``; a boolean prediction is used as it is.
- F1 = 2 TP / (2 TP + FP + FN) (equal to Dice), IoU = TP / (TP + FP + FN), over the pixels of one image.
- Empty ground truth: if the prediction is empty too, F1 = IoU = 1 (nothing to find, nothing claimed); if it is not,
  F1 = IoU = 0. The same holds for a non-empty ground truth with an empty prediction (0). This matches MONAI's
  ``ignore_empty=False``. Papers that score only manipulated images should drop authentic ones before averaging
  (``skip_empty_gt=True`` in :func:`pixel_scores` / :func:`mean_pixel_scores`).
- Best-threshold F1 ("F1-best" / optimal threshold per image in manipulation localisation papers) is the best F1
  over every threshold on that image, including "predict nothing"; it is an upper bound, not a deployable score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from loupe.core.metrics._arrays import MetricInputError, to_numpy


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray, bool]:
    """Flattened prediction and boolean ground truth; ``is_mask`` says the prediction was boolean."""
    is_mask = getattr(pred, "dtype", None) is not None and str(pred.dtype).endswith("bool")
    p, g = to_numpy(pred, "pred"), to_numpy(gt, "gt")
    if p.shape != g.shape:
        raise MetricInputError(f"prediction has shape {p.shape} but ground-truth mask has {g.shape}; they must match")
    p, g = p.ravel(), g.ravel()
    if not np.isin(g, (0.0, 1.0)).all():
        raise MetricInputError("ground-truth mask must hold only 0/1 (or bool); binarise it before scoring")
    if np.isnan(p).any():
        raise MetricInputError("prediction holds NaN scores")
    return p, g.astype(bool), is_mask


def _f1_iou(tp: float, fp: float, fn: float) -> tuple[float, float]:
    if tp + fp + fn == 0:  # empty ground truth and empty prediction
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def pixel_f1_iou(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """F1 and IoU of one image (conventions in the module docstring).

    Args:
        pred: score map (any shape, e.g. (H, W)), or a boolean mask used as it is.
        gt: ground-truth mask of the same shape, 0/1 or bool.
        threshold: score at or above which a pixel is called positive (ignored for boolean masks).

    Returns:
        ``(f1, iou)``, each in [0, 1].
    """
    p, g, is_mask = _pair(pred, gt)
    call = p.astype(bool) if is_mask else p >= threshold
    tp = float((call & g).sum())
    fp = float((call & ~g).sum())
    fn = float((~call & g).sum())
    return _f1_iou(tp, fp, fn)


def best_threshold_f1(score: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Best F1 of one image over all thresholds, and the threshold reaching it.

    Every distinct score is tried as a threshold (``score >= thr`` positive), plus ``+inf`` (predict nothing), so
    the result is exact, found in O(P log P) for P pixels. Ties go to the highest threshold.

    Returns:
        ``(f1, threshold)``; ``(1.0, inf)`` for an empty ground truth (predicting nothing is perfect).
    """
    p, g, _ = _pair(score, gt)
    n_pos = int(g.sum())
    if n_pos == 0:
        return 1.0, float("inf")
    order = np.argsort(-p, kind="mergesort")
    p, g = p[order], g[order]
    last = np.flatnonzero(np.r_[p[1:] != p[:-1], True])  # last index of each distinct score, descending
    tp = np.cumsum(g)[last]
    called = last + 1
    f1 = 2 * tp / (called + n_pos)  # 2TP / (2TP + FP + FN) with TP + FP = called, TP + FN = n_pos
    i = int(np.argmax(f1))
    return float(f1[i]), float(p[last[i]])


def pixel_scores(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    threshold: float = 0.5,
    skip_empty_gt: bool = False,
) -> pd.DataFrame:
    """Per-image pixel metrics over a batch.

    Args:
        preds: (B, H, W) score maps or a sequence of B maps of any sizes (boolean masks allowed).
        gts: matching ground-truth masks.
        threshold: as :func:`pixel_f1_iou`.
        skip_empty_gt: leave out images whose ground truth is empty (e.g. authentic images).

    Returns:
        One row per image kept: ``image`` (index in the batch), ``gt_pixels``, ``f1``, ``iou``, ``best_f1``,
        ``best_threshold``.
    """
    if len(preds) != len(gts):
        raise MetricInputError(f"got {len(preds)} predictions but {len(gts)} ground-truth masks")
    rows = []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        gt_pixels = int(to_numpy(gt, "gt").sum())
        if skip_empty_gt and gt_pixels == 0:
            continue
        f1, iou = pixel_f1_iou(pred, gt, threshold)
        best, best_thr = best_threshold_f1(pred, gt)
        rows.append((i, gt_pixels, f1, iou, best, best_thr))
    return pd.DataFrame(rows, columns=["image", "gt_pixels", "f1", "iou", "best_f1", "best_threshold"])


def mean_pixel_scores(
    preds: Sequence[np.ndarray] | np.ndarray,
    gts: Sequence[np.ndarray] | np.ndarray,
    threshold: float = 0.5,
    skip_empty_gt: bool = False,
) -> dict[str, float]:
    """Means over images of :func:`pixel_scores` (each image counts once, whatever its size).

    Returns:
        ``f1``, ``iou``, ``best_f1`` means and ``n_images`` used; NaN means when no image is left.
    """
    table = pixel_scores(preds, gts, threshold, skip_empty_gt)
    out = {k: float(table[k].mean()) if len(table) else float("nan") for k in ("f1", "iou", "best_f1")}
    out["n_images"] = len(table)
    return out


__all__ = ["best_threshold_f1", "mean_pixel_scores", "pixel_f1_iou", "pixel_scores"]
