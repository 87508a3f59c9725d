"""Calibration of predicted probabilities: expected calibration error, reliability table and plot.

Definition used here (binary / per label, "positive-class" calibration):
the interval [0, 1] is cut into ``n_bins`` equal-width bins ``[k/B, (k+1)/B)``, the last one closed at 1. For bin k
with ``n_k`` samples, ``mean_predicted_k`` is the mean of ``p`` and ``fraction_positive_k`` the mean of ``y``. Then

    ECE = sum_k (n_k / N) * |fraction_positive_k - mean_predicted_k|

with N the number of samples with a known label. This equals torchmetrics' ``binary_calibration_error`` with
``norm="l1"`` except for ``p == 1`` exactly, which torchmetrics puts in a bin of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from loupe.core.metrics._arrays import MetricInputError, masked_binary

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _binned(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masked labels and probabilities with their bin index, plus the bin edges (n_bins + 1,)."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise MetricInputError(f"n_bins must be a positive integer, got {n_bins!r}")
    y, p = masked_binary(y, p)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise MetricInputError(
            f"calibration needs probabilities in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]; "
            "apply the sigmoid / softmax first"
        )
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, int(n_bins) - 1)
    return y, p, bins, edges


def reliability_table(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin calibration statistics (definition in the module docstring); NaN labels masked.

    Args:
        y: labels (N,), 1 / 0 / NaN.
        p: predicted probability of the positive class (N,), in [0, 1].
        n_bins: number of equal-width bins.

    Returns:
        One row per bin, empty bins included: ``bin``, ``lower``, ``upper``, ``n``, ``mean_predicted``,
        ``fraction_positive``, ``gap`` (= fraction_positive - mean_predicted; NaN for empty bins), ``weight`` (n / N).
    """
    y, p, bins, edges = _binned(y, p, n_bins)
    n = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(bins, weights=p, minlength=n_bins) / n
        frac = np.bincount(bins, weights=y, minlength=n_bins) / n
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "lower": edges[:-1],
            "upper": edges[1:],
            "n": n,
            "mean_predicted": mean_p,
            "fraction_positive": frac,
            "gap": frac - mean_p,
            "weight": n / max(y.size, 1),
        }
    )


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error in [0, 1] (count-weighted mean |fraction positive - mean predicted| over
    equal-width bins; exact definition in the module docstring). NaN when no label is known.
    """
    table = reliability_table(y, p, n_bins)
    if table["n"].sum() == 0:
        return float("nan")
    used = table["n"] > 0
    return float((table.loc[used, "weight"] * table.loc[used, "gap"].abs()).sum())


def reliability_plot(
    y: np.ndarray,
    p: np.ndarray,
    n_bins: int = 15,
    title: str | None = None,
) -> Figure:
    """Reliability diagram: fraction positive per bin against the bin's mean prediction, with the diagonal of
    perfect calibration and a histogram of sample counts below. ECE is printed in the legend.

    Built on ``matplotlib.figure.Figure`` (no pyplot global state, no display needed); save it with
    ``fig.savefig(path)`` or log it as an artifact.
    """
    from matplotlib.figure import Figure  # optional heavy dependency, imported only when plotting

    table = reliability_table(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    used = table[table["n"] > 0]
    width = 1.0 / n_bins

    fig = Figure(figsize=(5, 6), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.bar(
        used["lower"] + width / 2,
        used["fraction_positive"],
        width=width * 0.9,
        alpha=0.7,
        edgecolor="black",
        label="fraction positive",
    )
    ax.plot(used["mean_predicted"], used["fraction_positive"], marker="o", color="C1", label=f"ECE = {ece:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    ax_n.bar(table["lower"] + width / 2, table["n"], width=width * 0.9, color="grey")
    ax_n.set(xlabel="predicted probability", ylabel="count")
    return fig


__all__ = ["expected_calibration_error", "reliability_plot", "reliability_table"]
