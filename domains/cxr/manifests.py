"""Manifest sources for the CXR recipes: NIH ChestX-ray14 / CheXpert label files or a ready manifest (CSV/Parquet).

``data.path`` names either a dataset label file (NIH ``labels.csv`` / ``Data_Entry_2017.csv``, CheXpert
``train.csv``), which the adapters of `loupe.domains.cxr.adapters` turn into a manifest, or a manifest itself.
Splits come from the manifest's ``split`` column when it has one, else from a group-aware split by patient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from loupe.core.errors import ConfigError
from loupe.core.models.spec import WeightSpec
from loupe.core.registry import LABEL_SETS
from loupe.core.transforms import ModelInput
from loupe.domains.cxr.data import DataConfig

ALL = "all"


def load_manifest(data: DataConfig) -> pd.DataFrame:
    """The manifest for ``data.path`` with a ``split`` column (train / val / test by patient)."""
    from loupe.core.data import read_manifest, split_by_group
    from loupe.domains.cxr.adapters import chexpert, nih_chestxray14

    p = Path(data.path)
    if not p.is_file():
        raise ConfigError(f"data.path {str(p)!r} does not exist; point it at labels.csv or a manifest CSV/Parquet")
    head = pd.read_csv(p, nrows=0).columns if p.suffix == ".csv" else pd.Index([])
    if "Finding Labels" in head:
        frame = nih_chestxray14(p)
    elif "Path" in head and "Frontal/Lateral" in head:
        frame = chexpert(p)
    else:
        frame = read_manifest(p)
    if "split" not in frame.columns:
        fractions = {"train": 1 - data.val_fraction - data.test_fraction, "val": data.val_fraction}
        fractions["test"] = data.test_fraction
        frame = split_by_group(frame, {k: v for k, v in fractions.items() if v > 0}, seed=0, labels=[])
    return frame


def manifest_split(data: DataConfig, spec: WeightSpec, split: str) -> Dataset:
    """Rows of ``split`` (or every row for ``all``) as samples through the spec's preprocessing."""
    from loupe.core.data import ManifestDataset

    frame = load_manifest(data)
    if split != ALL:
        frame = frame[frame["split"] == split]
    if data.limit:
        frame = frame.head(data.limit)
    if frame.empty:
        raise ConfigError(f"the manifest {data.path!r} has no rows in split {split!r}; check data.val_fraction etc.")
    labels = list(LABEL_SETS.get(data.label_set))
    missing = [c for c in labels if c not in frame.columns]
    if missing:
        raise ConfigError(f"data.label_set {data.label_set!r} needs columns {missing} that the manifest lacks")
    to_input = ModelInput(spec)

    def transform(array: np.ndarray, meta: dict) -> torch.Tensor:
        return to_input(array, meta.get("bits_stored") or meta.get("bit_depth"))

    root = Path(data.image_root) if data.image_root else Path(data.path).parent
    return ManifestDataset(frame.reset_index(drop=True), labels, root=root, transform=transform)


def subgroup_frame(ds: Dataset) -> pd.DataFrame:
    """The subgroup attributes (sex, age band, view) of a manifest dataset's rows, aligned by position."""
    from loupe.core.metrics import age_band

    frame = getattr(ds, "frame", None)
    out = pd.DataFrame(index=range(len(ds)))
    if frame is None:
        return out
    cols = {"sex": "meta_sex", "age": "meta_age", "view": "meta_view"}
    for key, col in cols.items():
        if col in frame.columns:
            values = frame[col].reset_index(drop=True)
            if key == "age":
                out["age_band"] = age_band(pd.to_numeric(values, errors="coerce")).to_numpy()
            else:
                out[key] = values.to_numpy()
    if "group" in frame.columns:
        out["group"] = frame["group"].reset_index(drop=True).to_numpy()
    return out
