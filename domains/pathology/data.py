"""Patch manifests and datasets for the pathology recipes, and H&E training augmentation.

A manifest (CSV/Parquet) has ``path`` (relative to the manifest's folder unless ``data.image_root`` says
otherwise; ``data.path_column`` names another column), ``label`` (a class name; ``data.label_column``), ``split``
(train / val / test; a train-only manifest gets a seeded, stratified validation share) and optionally ``group``
(slide or patient, ``data.group_column``: bootstrap CIs and the validation split respect it). ``data.classes``
fixes the classes and their order; rows with other labels are refused unless ``data.drop_other_labels``. Labels
become one 1/0 column per class, so the one dataset contract (`loupe.core.data.ManifestDataset`) serves them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loupe.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchData:
    manifest: str = "../shared/data/pathology/tcga_luadlusc/labels.csv"
    image_root: str = ""
    path_column: str = "path"
    label_column: str = "label"
    group_column: str = "group"
    classes: tuple[str, ...] = ()
    drop_other_labels: bool = False
    val_fraction: float = 0.2
    batch_size: int = 64
    num_workers: int = 0
    limit: int = 0

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.limit < 0:
            out.append("batch_size must be >= 1 and limit >= 0 (0 = all)")
        return out

    @property
    def root(self) -> Path:
        return Path(self.image_root) if self.image_root else Path(self.manifest).parent


def load_patch_manifest(data: PatchData, seed: int = 0) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The manifest with one 1/0 column per class and a ``split`` column (validation carved from train when the
    manifest has none), and the class names in order."""
    from loupe.core.data import read_manifest

    p = Path(data.manifest)
    if not p.is_file():
        raise ConfigError(f"data.manifest {str(p)!r} does not exist; pass a CSV/Parquet with path, label, split")
    frame = read_manifest(p)
    missing = [c for c in (data.path_column, data.label_column) if c not in frame.columns]
    if missing:
        raise ConfigError(f"manifest {p} lacks column(s) {missing}; it needs {data.path_column}, "
                          f"{data.label_column} (and split; data.path_column / label_column name others)")  # fmt: skip
    renames = {data.path_column: "path", data.group_column: "group"}
    frame = frame.rename(columns={k: v for k, v in renames.items() if k in frame.columns and k != v})
    classes = tuple(data.classes) or tuple(sorted(frame[data.label_column].astype(str).unique()))
    unknown = sorted(set(frame[data.label_column].astype(str)) - set(classes))
    if unknown and data.drop_other_labels:
        keep = frame[data.label_column].astype(str).isin(classes)
        log.warning(
            "manifest %s: %d row(s) with labels %s left out (data.drop_other_labels)", p, (~keep).sum(), unknown
        )
        frame = frame[keep]
    elif unknown:
        raise ConfigError(f"manifest {p}: labels {unknown} are not among data.classes {list(classes)}; list them, "
                          "or set data.drop_other_labels=true to leave those rows out")  # fmt: skip
    if "split" not in frame.columns:
        frame["split"] = "train"
    if not (frame["split"] == "val").any() and data.val_fraction > 0:
        frame = _carve_val(frame, data, seed)
    for c in classes:
        frame[c] = (frame[data.label_column].astype(str) == c).astype(float)
    if data.limit:
        frame = frame.groupby("split", group_keys=False).head(data.limit)
    return frame.reset_index(drop=True), classes


def _carve_val(frame: pd.DataFrame, data: PatchData, seed: int) -> pd.DataFrame:
    """A stratified validation share of train, by group when there is one (no group in two splits)."""
    rng = np.random.default_rng(seed)
    frame = frame.copy()
    train = frame[frame["split"] == "train"]
    key = train["group"] if "group" in train.columns else train.index.to_series()
    for _, rows in train.groupby(train[data.label_column].astype(str)):
        units = key.loc[rows.index].unique()
        chosen = set(rng.choice(units, size=max(1, round(len(units) * data.val_fraction)), replace=False))
        frame.loc[rows.index[key.loc[rows.index].isin(chosen)], "split"] = "val"
    return frame


def patch_dataset(frame: pd.DataFrame, classes: tuple[str, ...], data: PatchData, spec, split: str):
    """Rows of ``split`` as samples ``{"image": [3, H, W] normalised, "label": one-hot, "meta"}``."""
    from loupe.core.data import ManifestDataset
    from loupe.core.transforms import ModelInput

    rows = frame[frame["split"] == split]
    if rows.empty:
        raise ConfigError(f"the manifest {data.manifest} has no {split!r} rows")
    prep = ModelInput(spec)
    return ManifestDataset(rows.reset_index(drop=True), list(classes), root=data.root,
                           transform=lambda a, m: prep(a, m.get("bit_depth")))  # fmt: skip


@dataclass(frozen=True)
class HEAugment:
    """Per-sample augmentation of a normalised RGB batch ``[B, 3, H, W]`` for H&E: the eight flips / right-angle
    rotations (tissue has no up), and a light stain jitter (per-channel gain ± ``stain``, brightness ± ``light``)
    standing in for scanner and staining differences."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    stain: float = 0.05
    light: float = 0.1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        u = x * std + mean
        k = torch.randint(0, 4, (b,))
        flip = torch.rand(b) < 0.5
        u = torch.stack([torch.rot90(u[i].flip(-1) if flip[i] else u[i], int(k[i]), (-2, -1)) for i in range(b)])
        gain = 1 + (torch.rand(b, 3, 1, 1, device=dev) * 2 - 1) * self.stain
        light = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.light
        return ((u * gain * light).clamp(0, 1) - mean) / std
