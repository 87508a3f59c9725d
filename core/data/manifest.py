"""Manifests: one row per image, as CSV or Parquet, and a validator that reports every problem at once.

Columns:

- ``path`` — the image file, relative to the manifest's root folder (or absolute);
- ``group`` — patient, slide or source video: splits never put one group in two splits;
- ``split`` (optional) — ``train`` / ``val`` / ``test``;
- ``meta_*`` — anything kept for subgroup analysis (``meta_age``, ``meta_sex``, ``meta_view``...);
- every other column is a label: 1 = present, 0 = absent, empty = unknown (masked in the loss).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from loupe.core.io.common import input_error

PATH, GROUP, SPLIT, META_PREFIX = "path", "group", "split", "meta_"
SPLITS = ("train", "val", "test")
MAX_LISTED = 20  # problems of one kind listed one by one before the rest are summarised


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (row / path / column), what, and how to fix it."""

    where: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}; {self.fix}"


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest (by content: Parquet files start with ``PAR1``); paths and groups as text."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            is_parquet = fh.read(4) == b"PAR1"
        frame = pd.read_parquet(p) if is_parquet else pd.read_csv(p, dtype={PATH: str, GROUP: str, SPLIT: str})
    except FileNotFoundError as exc:
        raise input_error(p, "the manifest does not exist", "check the path") from exc
    except Exception as exc:  # noqa: BLE001 - boundary: pandas / pyarrow raise many types on bad files
        raise input_error(p, f"cannot be read as CSV or Parquet ({type(exc).__name__}: {exc})", "re-export it") from exc
    return frame


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as Parquet when ``path`` ends in ``.parquet``, else as CSV (unknown labels as empty cells)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".parquet":
        frame.to_parquet(p, index=False)
    else:
        frame.to_csv(p, index=False)
    return p


def label_columns(frame: pd.DataFrame) -> list[str]:
    """The label columns of a manifest: all but ``path``, ``group``, ``split`` and ``meta_*``."""
    return [c for c in frame.columns if c not in (PATH, GROUP, SPLIT) and not str(c).startswith(META_PREFIX)]


def validate_manifest(
    frame: pd.DataFrame,
    *,
    root: str | Path | None = None,
    labels: Sequence[str] | None = None,
    check_files: bool = True,
) -> list[Problem]:
    """Every problem in ``frame`` (an empty list when it is valid).

    Checks the required columns, the expected ``labels`` (default: every label column), label values (1 / 0 /
    empty), empty and duplicated paths, empty groups, split names, groups found in two splits and, with
    ``check_files``, that each path exists under ``root`` (default: the current folder).
    """
    problems = _column_problems(frame, labels)
    if PATH in frame.columns:
        problems += _path_problems(frame, Path(root) if root is not None else Path("."), check_files)
    if GROUP in frame.columns:
        empty = frame.index[frame[GROUP].isna() | (frame[GROUP].astype(str).str.strip() == "")]
        problems += _listed(empty, "no group", f"fill '{GROUP}' with the patient, slide or video id")
    for column in labels if labels is not None else label_columns(frame):
        if column in frame.columns:
            problems += _label_value_problems(frame, column)
    if SPLIT in frame.columns:
        problems += _split_problems(frame)
    return problems


def _column_problems(frame: pd.DataFrame, labels: Sequence[str] | None) -> list[Problem]:
    problems = []
    for column, what in ((PATH, "the image file"), (GROUP, "the patient, slide or source video id")):
        if column not in frame.columns:
            problems.append(Problem("columns", f"required column '{column}' is missing", f"add it ({what})"))
    found = label_columns(frame)
    if labels is not None:
        for name in labels:
            if name not in frame.columns:
                close = ", ".join(repr(c) for c in found[:10])
                problems.append(Problem("columns", f"label column '{name}' is missing", f"label columns are {close}"))
    elif not found:
        problems.append(Problem("columns", "no label column", "add one 1/0/empty column per label"))
    return problems


def _path_problems(frame: pd.DataFrame, root: Path, check_files: bool) -> list[Problem]:
    paths = frame[PATH]
    empty = frame.index[paths.isna() | (paths.astype(str).str.strip() == "")]
    problems = _listed(empty, "empty path", "give every row an image path")
    dup = paths[paths.duplicated(keep=False) & paths.notna()]
    for value, rows in dup.groupby(dup).groups.items():
        where = f"path {value!r} (rows {', '.join(str(r) for r in list(rows)[:10])})"
        problems.append(Problem(where, f"listed {len(rows)} times", "keep one row per image"))
    if check_files:
        missing = [i for i, v in paths.items() if isinstance(v, str) and v.strip() and not (root / v).is_file()]
        problems += _listed(missing, "file not found", f"check the path or pass --root (now {root})", frame)
    return problems


def _label_value_problems(frame: pd.DataFrame, column: str) -> list[Problem]:
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = frame[column].notna() & ~(values.isin([0, 1]))
    if not bad.any():
        return []
    shown = sorted({str(v) for v in frame.loc[bad, column]})[:5]
    rows = ", ".join(str(r) for r in frame.index[bad][:10])
    return [
        Problem(
            f"label '{column}' (rows {rows}{', ...' if bad.sum() > 10 else ''})",
            f"{int(bad.sum())} value(s) not 1, 0 or empty: {', '.join(shown)}",
            "use 1, 0 or an empty cell for unknown (CheXpert -1: use the adapter's uncertain policy)",
        )
    ]


def _split_problems(frame: pd.DataFrame) -> list[Problem]:
    problems = []
    split = frame[SPLIT]
    bad = split.notna() & ~split.isin(SPLITS)
    if bad.any():
        shown = ", ".join(sorted({str(v) for v in split[bad]})[:5])
        problems.append(Problem(f"column '{SPLIT}'", f"unknown split name(s) {shown}", f"use {', '.join(SPLITS)}"))
    if GROUP in frame.columns:
        for group, splits in leaked_groups(frame).items():
            problems.append(
                Problem(f"group {group!r}", f"is in {len(splits)} splits ({', '.join(splits)})", "re-split by group")
            )
    return problems


def leaked_groups(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Groups whose rows sit in more than one split, with those splits (empty when splits are clean)."""
    known = frame[frame[SPLIT].notna() & frame[GROUP].notna()]
    per_group = known.groupby(known[GROUP].astype(str))[SPLIT].unique()
    return {str(g): sorted(map(str, s)) for g, s in per_group.items() if len(s) > 1}


def _listed(rows: Iterable, message: str, fix: str, frame: pd.DataFrame | None = None) -> list[Problem]:
    rows = list(rows)

    def where(r) -> str:
        return f"row {r}" + (f" ({frame.at[r, PATH]})" if frame is not None else "")

    problems = [Problem(where(r), message, fix) for r in rows[:MAX_LISTED]]
    if len(rows) > MAX_LISTED:
        problems.append(Problem(f"{len(rows) - MAX_LISTED} more rows", message, fix))
    return problems


@dataclass(frozen=True)
class LabelAlignment:
    """How a dataset's labels were mapped onto a model's: kept, missing (→ unknown), dropped (not in the model)."""

    kept: tuple[str, ...]
    missing: tuple[str, ...]
    dropped: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{len(self.kept)} label(s) kept; missing in the data, set unknown: {list(self.missing) or 'none'}; "
            f"not used by the model, dropped: {list(self.dropped) or 'none'}"
        )


def align_labels(
    frame_or_labels: pd.DataFrame | np.ndarray,
    dataset_labels: Sequence[str],
    model_labels: Sequence[str],
) -> tuple[pd.DataFrame | np.ndarray, LabelAlignment]:
    """Reorder label columns to ``model_labels``: labels the data lacks become unknown (NaN), extras are dropped.

    ``frame_or_labels`` is a manifest (its non-label columns are kept in front) or an ``[N, len(dataset_labels)]``
    array (returns ``[N, len(model_labels)]`` float).
    """
    report = LabelAlignment(
        kept=tuple(n for n in model_labels if n in dataset_labels),
        missing=tuple(n for n in model_labels if n not in dataset_labels),
        dropped=tuple(n for n in dataset_labels if n not in model_labels),
    )
    if isinstance(frame_or_labels, pd.DataFrame):
        frame = frame_or_labels
        keep = [c for c in frame.columns if c not in dataset_labels]
        out = frame[keep].copy()
        for name in model_labels:
            out[name] = pd.to_numeric(frame[name], errors="coerce") if name in dataset_labels else np.nan
        return out, report
    values = np.asarray(frame_or_labels, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != len(dataset_labels):
        raise ValueError(f"labels of shape {values.shape} do not match {len(dataset_labels)} dataset labels")
    out_arr = np.full((values.shape[0], len(model_labels)), np.nan)
    for j, name in enumerate(model_labels):
        if name in dataset_labels:
            out_arr[:, j] = values[:, list(dataset_labels).index(name)]
    return out_arr, report
