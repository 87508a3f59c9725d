"""Subgroup performance tables: AUROC per label within each value of a metadata attribute, and its gap to the
AUROC on all samples (the layout of "Fairness and Robustness of CLIP-Based Models for Chest X-rays")."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from loupe.core.metrics._arrays import MetricInputError, as_2d, check_same_shape, label_names_for, to_numpy
from loupe.core.metrics.classification import auroc

logger = logging.getLogger(__name__)

COLUMNS = ["attribute", "group", "n", "n_pos", "label", "auroc", "overall_auroc", "gap"]


def age_band(
    ages: Sequence[float] | np.ndarray | pd.Series, edges: Sequence[int] = (0, 20, 40, 60, 80, 200)
) -> pd.Series:
    """Cut ages in years into bands ``[edges[i], edges[i+1])`` labelled ``"40-59"``.

    The last band is labelled open-ended (``"80+"``) since its upper edge is only a cap. Ages that are NaN or
    outside ``[edges[0], edges[-1])`` get a missing value (excluded from subgroup tables).

    Returns:
        An ordered categorical Series (bands in age order), with the index of ``ages`` when it is a Series.
    """
    edges = [int(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise MetricInputError(f"age band edges must be at least two strictly increasing numbers, got {edges}")
    index = ages.index if isinstance(ages, pd.Series) else None
    values = to_numpy(ages, "ages")
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1], strict=True)] + [f"{edges[-2]}+"]
    bands = pd.cut(values, bins=edges, right=False, labels=names, ordered=True)
    return pd.Series(bands, index=index, name="age_band")


def subgroup_table(
    Y: np.ndarray,
    S: np.ndarray,
    label_names: Sequence[str] | None,
    meta: pd.DataFrame,
    by: Sequence[str] = ("sex", "age_band", "view"),
    min_n: int = 20,
    macro: bool = True,
) -> pd.DataFrame:
    """AUROC per (attribute, group, label) with the gap to the overall AUROC of that label.

    Args:
        Y: labels (N, L), 1 / 0 / NaN.
        S: scores (N, L).
        label_names: L names, or None for ``label_0 ...``.
        meta: N rows aligned with Y by position, holding the ``by`` columns (build ``age_band`` with
            :func:`age_band`). Rows whose attribute value is missing are left out of that attribute's groups.
        by: metadata columns to split on.
        min_n: a group-label cell with fewer known labels than this gets AUROC NaN (too small to report); cells
            with one class only are NaN as well.
        macro: add rows ``label="macro"`` per group: mean AUROC over the labels defined in the group, with
            ``overall_auroc`` the mean overall AUROC over the same labels, so gap = mean of the per-label gaps.

    Returns:
        Long table with columns ``attribute``, ``group``, ``n`` (known labels; group size on macro rows),
        ``n_pos`` (missing on macro rows), ``label``, ``auroc``, ``overall_auroc``, ``gap`` = auroc - overall_auroc.
    """
    Y, S = as_2d(Y, "Y"), as_2d(S, "S")
    check_same_shape(Y, S, "Y", "S")
    names = label_names_for(Y.shape[1], label_names)
    if len(meta) != Y.shape[0]:
        raise MetricInputError(f"meta has {len(meta)} rows but Y has {Y.shape[0]} samples; align them by position")
    missing = [c for c in by if c not in meta.columns]
    if missing:
        raise MetricInputError(f"meta lacks subgroup columns {missing}; it has {list(meta.columns)}")
    overall = np.array([auroc(Y[:, j], S[:, j]) for j in range(Y.shape[1])])

    rows: list[tuple] = []
    for attribute in by:
        column = meta[attribute].reset_index(drop=True)
        for group, idx in column.groupby(column, observed=True, sort=True).groups.items():
            idx = np.asarray(idx)
            rows.extend(_group_rows(attribute, group, Y[idx], S[idx], names, overall, min_n, macro))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"n": "Int64", "n_pos": "Int64"})


def _group_rows(attribute, group, Y, S, names, overall, min_n, macro) -> list[tuple]:
    rows, group_auroc = [], np.full(len(names), np.nan)
    for j, name in enumerate(names):
        n = int((~np.isnan(Y[:, j])).sum())
        if n >= min_n:
            group_auroc[j] = auroc(Y[:, j], S[:, j])
        else:
            logger.debug("%s=%s, %s: %d known labels < min_n=%d; AUROC not reported", attribute, group, name, n, min_n)
        rows.append((attribute, group, n, int(np.nansum(Y[:, j])), name, group_auroc[j], overall[j],
                     group_auroc[j] - overall[j]))  # fmt: skip
    if macro:
        ok = ~np.isnan(group_auroc) & ~np.isnan(overall)
        g = float(group_auroc[ok].mean()) if ok.any() else np.nan
        o = float(overall[ok].mean()) if ok.any() else np.nan
        rows.append((attribute, group, len(Y), pd.NA, "macro", g, o, g - o))
    return rows


__all__ = ["age_band", "subgroup_table"]
