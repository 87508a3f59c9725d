"""Group-aware train / val / test splits: a patient, slide or source video never lands in two splits.

Groups are stratified by their rarest positive label, then dealt out, within each stratum, to whichever split is
furthest below its target share of images; the shuffle is seeded, so a split is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from loupe.core.data.manifest import GROUP, SPLIT, label_columns
from loupe.core.errors import ConfigError

DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def split_by_group(
    frame: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    *,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    group_col: str = GROUP,
) -> pd.DataFrame:
    """A copy of ``frame`` with a ``split`` column; ``fractions`` are target shares of images per split.

    ``labels`` (default: the manifest's label columns) stratify the split; pass ``[]`` to turn that off.
    """
    _check_fractions(fractions)
    if group_col not in frame.columns or frame[group_col].isna().any():
        raise ConfigError(f"every row needs a '{group_col}' value to split by group; fill it or pick another column")
    names = list(fractions)
    share = np.array([fractions[n] for n in names], dtype=np.float64)
    groups = frame[group_col].astype(str)
    sizes = groups.value_counts()
    strata = _strata(frame, groups, label_columns(frame) if labels is None else list(labels))
    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for stratum in sorted(strata.unique()):
        members = np.array(sorted(strata.index[strata == stratum]))
        rng.shuffle(members)
        total, filled = sizes[members].sum(), np.zeros(len(names))
        for group in members:
            k = int(np.argmax(share * total - filled))  # the split furthest below its target
            assigned[group] = names[k]
            filled[k] += sizes[group]
    out = frame.copy()
    out[SPLIT] = groups.map(assigned).to_numpy()
    return out


def _check_fractions(fractions: Mapping[str, float]) -> None:
    problems = [f"fraction {k}={v} must be between 0 and 1" for k, v in fractions.items() if not 0 <= v <= 1]
    total = sum(fractions.values())
    if not fractions or abs(total - 1.0) > 1e-6:
        problems.append(f"fractions {dict(fractions)} must sum to 1 (they sum to {total:g})")
    if problems:
        raise ConfigError(problems)


def _strata(frame: pd.DataFrame, groups: pd.Series, labels: list[str]) -> pd.Series:
    """Per group: its rarest positive label ("none" when it has none), so rare findings spread over splits."""
    if not labels:
        return pd.Series("none", index=sorted(groups.unique()))
    positives = (frame[labels].apply(pd.to_numeric, errors="coerce") == 1).groupby(groups.to_numpy()).any()
    prevalence = positives.sum(axis=0)
    order = [c for c in prevalence.sort_values(kind="stable").index if prevalence[c] > 0]

    def rarest(row: pd.Series) -> str:
        return next((c for c in order if row[c]), "none")

    return positives.apply(rarest, axis=1)
