"""Percentile bootstrap confidence intervals, by sample or by group (patient / slide / video).

A resample is represented by how many times it draws each sample: a count matrix ``(n_boot, N)``. With ``groups``
(one id per sample) whole groups are drawn with replacement and every sample inherits its group's count: the
cluster bootstrap, which keeps the images of one patient together as the splits do. A generic metric sees the
resample as the samples repeated by their counts; AUROC uses the counts directly as weights, which gives the same
numbers with no Python loop over resamples.

Resamples where the metric is undefined (NaN, e.g. one class only) are skipped and the number used is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from loupe.core.metrics._arrays import (
    MetricInputError,
    as_2d,
    check_same_shape,
    label_names_for,
    masked_binary,
    to_numpy,
)
from loupe.core.metrics.classification import auroc

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 4_000_000  # count-matrix entries per chunk: bounds memory for large N


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with its percentile interval.

    Attributes:
        estimate: the metric on the full data.
        low, high: the ``alpha/2`` and ``1 - alpha/2`` percentiles of the bootstrap distribution (NaN if no
            resample was usable).
        n_used: resamples where the metric was defined.
        n_boot: resamples drawn.
    """

    estimate: float
    low: float
    high: float
    n_used: int
    n_boot: int


def percentile_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """``(alpha/2, 1 - alpha/2)`` percentiles (linear interpolation) of the non-NaN values; NaNs if none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _check_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise MetricInputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise MetricInputError(f"alpha must be in (0, 1) (0.05 gives a 95% interval), got {alpha}")


def resample_counts(
    n: int, n_boot: int, seed: int = 0, groups: Sequence | np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield count matrices ``(chunk, n)``, chunks totalling ``n_boot`` rows: row b says how often resample b draws
    each of the n samples. With ``groups`` (n ids) whole groups are drawn; the same seed gives the same resamples.
    """
    if groups is None:
        codes, n_units = np.arange(n), n
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise MetricInputError(f"groups must hold one id per sample ({n},), got shape {groups.shape}")
        _, codes = np.unique(groups, return_inverse=True)
        n_units = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n_units, 1))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))  # [b, n_units]
        flat = (draws + np.arange(b)[:, None] * n_units).ravel()
        unit_counts = np.bincount(flat, minlength=b * n_units).reshape(b, n_units)
        yield unit_counts[:, codes]  # [b, n]


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    s: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of ``metric_fn(y, s)``.

    Args:
        metric_fn: takes resampled ``(y, s)`` and returns a float, NaN when undefined (as every metric in
            :mod:`loupe.core.metrics` does). Resamples keep the samples' order and repeat each by its count.
        y, s: arrays indexed by sample along axis 0, e.g. (N,) for one label or (N, L) for a macro metric.
        n_boot: resamples to draw.
        alpha: 0.05 for a 95% interval.
        seed: seed of the resampling generator (independent of global random state).
        groups: optional (N,) group id per sample (patient); whole groups are resampled (cluster bootstrap).

    Returns:
        :class:`BootstrapCI` with the estimate on the full data, the interval and the number of usable resamples.
    """
    _check_args(n_boot, alpha)
    y, s = to_numpy(y, "y"), to_numpy(s, "s")
    if y.shape[0] != s.shape[0]:
        raise MetricInputError(f"y has {y.shape[0]} samples but s has {s.shape[0]}")
    n = y.shape[0]
    values = np.empty(n_boot)
    i = 0
    for counts in resample_counts(n, n_boot, seed, groups):
        for row in counts:
            idx = np.repeat(np.arange(n), row)
            values[i] = metric_fn(y[idx], s[idx])
            i += 1
    return _summarise(float(metric_fn(y, s)), values, alpha, "metric")


def _summarise(estimate: float, values: np.ndarray, alpha: float, what: str) -> BootstrapCI:
    n_used = int((~np.isnan(values)).sum())
    if n_used < values.size:
        level = logging.WARNING if n_used < 0.9 * values.size else logging.DEBUG
        logger.log(level, "%s undefined in %d of %d bootstrap resamples; CI from %d", what,
                   values.size - n_used, values.size, n_used)  # fmt: skip
    low, high = percentile_interval(values, alpha)
    return BootstrapCI(estimate=estimate, low=low, high=high, n_used=n_used, n_boot=int(values.size))


def weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one labelled sample set under many weightings at once (ties count half, as sklearn).

    Args:
        y: labels (N,), 0/1, no NaN.
        s: scores (N,).
        weights: (B, N) non-negative sample weights, e.g. bootstrap counts.

    Returns:
        (B,) AUROC per weighting; NaN where the positive or negative weight is zero.
    """
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], weights[:, order]  # [B, N]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each tied score value
    pos = np.add.reduceat(w * y, starts, axis=1)  # [B, G] positive weight per distinct score
    neg = np.add.reduceat(w * (1 - y), starts, axis=1)  # [B, G]
    neg_below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def per_label_auroc_ci(
    Y: np.ndarray,
    S: np.ndarray,
    label_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
    macro: bool = True,
) -> pd.DataFrame:
    """Per-label AUROC with percentile bootstrap CIs; all labels share the same resamples (paired).

    Args:
        Y: labels (N, L), 1 / 0 / NaN (NaN masked per label).
        S: scores (N, L).
        label_names: L names; default ``label_0 ...``.
        n_boot, alpha, seed, groups: as :func:`bootstrap_ci`; ``groups`` (N,) gives the cluster bootstrap.
        macro: add a final row ``label="macro"``: the mean AUROC over labels defined on the full data, with a CI
            from the resamples where all of those labels are defined.

    Returns:
        Rows ``label``, ``n``, ``n_pos``, ``auroc``, ``ci_low``, ``ci_high``, ``n_boot_used``. The values equal
        ``bootstrap_ci(auroc, Y[:, j], S[:, j], ...)`` with the same seed and groups.
    """
    _check_args(n_boot, alpha)
    Y, S = as_2d(Y, "Y"), as_2d(S, "S")
    check_same_shape(Y, S, "Y", "S")
    names = label_names_for(Y.shape[1], label_names)
    known = ~np.isnan(Y)  # [N, L]
    for j in range(Y.shape[1]):
        masked_binary(Y[:, j], S[:, j])  # validate every label before the long loop
    boot = np.empty((n_boot, Y.shape[1]))  # [n_boot, L]
    start = 0
    for counts in resample_counts(Y.shape[0], n_boot, seed, groups):
        for j in range(Y.shape[1]):
            k = known[:, j]
            boot[start : start + len(counts), j] = weighted_auroc(Y[k, j], S[k, j], counts[:, k])
        start += len(counts)

    rows = []
    estimates = np.array([auroc(Y[:, j], S[:, j]) for j in range(Y.shape[1])])
    for j, name in enumerate(names):
        ci = _summarise(estimates[j], boot[:, j], alpha, f"AUROC of {name!r}")
        n_pos = int(np.nansum(Y[:, j]))
        rows.append((name, int(known[:, j].sum()), n_pos, ci.estimate, ci.low, ci.high, ci.n_used))
    if macro:
        defined = ~np.isnan(estimates)
        if defined.any():
            per_resample = boot[:, defined].mean(axis=1)  # NaN if any defined label is undefined in the resample
            ci = _summarise(float(estimates[defined].mean()), per_resample, alpha, "macro AUROC")
        else:
            ci = BootstrapCI(float("nan"), float("nan"), float("nan"), 0, n_boot)
        rows.append(("macro", Y.shape[0], pd.NA, ci.estimate, ci.low, ci.high, ci.n_used))
    df = pd.DataFrame(rows, columns=["label", "n", "n_pos", "auroc", "ci_low", "ci_high", "n_boot_used"])
    return df.astype({"n": "Int64", "n_pos": "Int64", "n_boot_used": "Int64"})


__all__ = [
    "BootstrapCI",
    "bootstrap_ci",
    "per_label_auroc_ci",
    "percentile_interval",
    "resample_counts",
    "weighted_auroc",
]


def paired_macro_auroc_difference(
    Y: np.ndarray,
    S_a: np.ndarray,
    S_b: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> BootstrapCI:
    """Macro AUROC of scores ``S_a`` minus that of ``S_b`` on the same samples, with a paired percentile bootstrap
    CI (both scored on every resample): whether model A beats baseline B, not just whether their CIs overlap.

    ``Y`` (N, L) 1 / 0 / NaN; ``S_a``, ``S_b`` (N, L); labels undefined on the full data are left out of both means.
    """
    _check_args(n_boot, alpha)
    Y, S_a, S_b = as_2d(Y, "Y"), as_2d(S_a, "S_a"), as_2d(S_b, "S_b")
    check_same_shape(Y, S_a, "Y", "S_a")
    check_same_shape(Y, S_b, "Y", "S_b")
    est = np.array([[auroc(Y[:, j], S[:, j]) for j in range(Y.shape[1])] for S in (S_a, S_b)])  # [2, L]
    defined = ~np.isnan(est).any(axis=0)
    if not defined.any():
        return BootstrapCI(float("nan"), float("nan"), float("nan"), 0, n_boot)
    known = ~np.isnan(Y)
    diff = np.empty(n_boot)
    start = 0
    for counts in resample_counts(Y.shape[0], n_boot, seed, groups):
        per = np.zeros((len(counts), 2))
        for j in np.flatnonzero(defined):
            k = known[:, j]
            per[:, 0] += weighted_auroc(Y[k, j], S_a[k, j], counts[:, k])
            per[:, 1] += weighted_auroc(Y[k, j], S_b[k, j], counts[:, k])
        diff[start : start + len(counts)] = (per[:, 0] - per[:, 1]) / defined.sum()
        start += len(counts)
    estimate = float(est[0, defined].mean() - est[1, defined].mean())
    return _summarise(estimate, diff, alpha, "macro AUROC difference")
