"""Forensics manifests and datasets: real (0) / fake (1) labels, seeded splits by group, the faces layout adapter.

A manifest (CSV/Parquet) has ``path`` (relative to the manifest's folder unless ``data.image_root`` says
otherwise), ``label`` (0/1 or real/fake names, mapped explicitly by ``data.fake_values`` / ``data.real_values``;
anything else is refused), optionally ``split`` (train / val / test), ``group`` (the source identity, camera or
video: splits and bootstrap CIs respect it) and ``generator`` (the generator of each fake, for
leave-one-generator-out). Without ``split`` a seeded split by group, else by image, stratified by label, holds out
``data.test_fraction`` for test; without ``val`` rows ``data.val_fraction`` of train is held out for validation.

``data.layout=faces_csv`` reads the Kaggle real-vs-fake faces layout (`faces_csv`; also ``loupe data convert
faces_csv DATA_CSV -o manifest.csv``) instead of a manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loupe.core.errors import ConfigError
from loupe.core.registry import ADAPTERS
from loupe.domains.forensics.models import LABEL
from loupe.domains.forensics.robustness import AugmentConfig, TrainAugment, as_rgb8

log = logging.getLogger(__name__)


def faces_csv(csv_path: str | Path) -> pd.DataFrame:
    """The Kaggle real-vs-fake faces layout (``data.csv``: ``images_id,label`` with label ``real`` / ``fake``;
    images at ``images/<label>/<images_id>.jpg`` beside it) → manifest ``path, label, group`` (each image its own
    group). Rows whose image is missing are left out and counted in a warning (the shared copy lists 100 such)."""
    p = Path(csv_path)
    frame = pd.read_csv(p, dtype=str)
    if not {"images_id", "label"} <= set(frame.columns):
        raise ConfigError(f"{p}: expected columns images_id,label (the faces_csv layout), got {list(frame.columns)}")
    paths = "images/" + frame["label"].str.strip() + "/" + frame["images_id"].str.strip() + ".jpg"
    exists = paths.map(lambda rel: (p.parent / rel).is_file())
    if not exists.all():
        log.warning("%s: %d of %d listed images are missing and left out (e.g. %s)", p, (~exists).sum(), len(frame),
                    paths[~exists].iloc[0])  # fmt: skip
    out = pd.DataFrame({"path": paths[exists], "label": frame["label"][exists].str.strip()})
    out["group"] = out["path"]
    return out.reset_index(drop=True)


ADAPTERS.register("faces_csv", faces_csv, domain="forensics", inputs=("DATA_CSV",),
                  doc="real-vs-fake faces data.csv (images_id,label) + images/<label>/<id>.jpg")  # fmt: skip


@dataclass(frozen=True)
class ForensicsData:
    manifest: str = "../shared/data/faces/real_vs_stylegan2/data.csv"
    layout: str = "manifest"
    image_root: str = ""
    path_column: str = "path"
    label_column: str = "label"
    group_column: str = "group"
    generator_column: str = "generator"
    fake_values: tuple[str, ...] = ("1", "fake")
    real_values: tuple[str, ...] = ("0", "real")
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    batch_size: int = 32
    num_workers: int = 0
    limit: int = 0

    def problems(self) -> list[str]:
        out = [] if self.layout in ("manifest", "faces_csv") else [
            f"layout: expected manifest or faces_csv, got {self.layout!r}"]  # fmt: skip
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            out.append(f"test_fraction and val_fraction must be in (0, 1), got {self.test_fraction}, "
                       f"{self.val_fraction}")  # fmt: skip
        if self.batch_size < 1 or self.limit < 0 or self.num_workers < 0:
            out.append("batch_size must be >= 1, limit >= 0 (0 = all) and num_workers >= 0")
        clash = {v.lower() for v in self.fake_values} & {v.lower() for v in self.real_values}
        if clash:
            out.append(f"fake_values and real_values share {sorted(clash)}")
        return out

    @property
    def root(self) -> Path:
        return Path(self.image_root) if self.image_root else Path(self.manifest).parent


def label_key(v: Any) -> str:
    """A label value as ``fake_values`` / ``real_values`` are matched: 1.0 → ``1``, ' Fake' → ``fake``."""
    try:
        f = float(v)
        return str(int(f)) if f.is_integer() else str(f)
    except (TypeError, ValueError):
        return str(v).strip().lower()


def load_forensics_manifest(data: ForensicsData, seed: int = 0) -> pd.DataFrame:
    """The manifest with ``path``, ``Fake`` (1.0 / 0.0), ``split`` (train / val / test) and, when present,
    ``group`` and ``generator``. Missing splits are drawn with ``seed`` by group (else by image), stratified."""
    from loupe.core.data import read_manifest

    p = Path(data.manifest)
    if not p.is_file():
        raise ConfigError(f"data.manifest {str(p)!r} does not exist; pass a CSV/Parquet with path, label[, split]")
    frame = faces_csv(p) if data.layout == "faces_csv" else read_manifest(p)
    missing = [c for c in (data.path_column, data.label_column) if c not in frame.columns]
    if missing:
        raise ConfigError(f"manifest {p} lacks column(s) {missing}; it needs {data.path_column}, {data.label_column}"
                          " (data.path_column / data.label_column name others)")  # fmt: skip
    renames = {data.path_column: "path", data.group_column: "group", data.generator_column: "generator"}
    frame = frame.rename(columns={k: v for k, v in renames.items() if k in frame.columns and k != v})
    keys = frame[data.label_column].map(label_key)
    fake, real = {v.lower() for v in data.fake_values}, {v.lower() for v in data.real_values}
    unknown = sorted(set(keys) - fake - real)
    if unknown:
        raise ConfigError(f"manifest {p}: label values {unknown} are neither fake {sorted(fake)} nor real "
                          f"{sorted(real)}; map them with data.fake_values / data.real_values")  # fmt: skip
    frame[LABEL] = keys.isin(fake).astype(float).to_numpy()
    if "split" not in frame.columns:
        frame = _split(frame, {"train": 1.0 - data.test_fraction, "test": data.test_fraction}, seed)
    bad = sorted(set(frame["split"].astype(str)) - {"train", "val", "test"})
    if bad:
        raise ConfigError(f"manifest {p}: split values {bad}; use train, val or test")
    if not (frame["split"] == "val").any():
        train = frame[frame["split"] == "train"]
        carved = _split(train, {"train": 1.0 - data.val_fraction, "val": data.val_fraction}, seed)
        frame.loc[carved.index, "split"] = carved["split"]
    for s in ("train", "val", "test"):
        counts = frame.loc[frame["split"] == s, LABEL].value_counts()
        if len(counts) < 2:
            raise ConfigError(f"manifest {p}: the {s} split holds {dict(counts)} (Fake 1/0); it needs real and fake "
                              "images (more rows, or another data.test_fraction / val_fraction)")  # fmt: skip
    if data.limit:
        frame = frame.groupby(["split", LABEL], group_keys=False).head(data.limit)
    return frame.reset_index(drop=True)


def _split(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.DataFrame:
    from loupe.core.data.splits import split_by_group

    keyed = frame.assign(_unit=frame["group"].astype(str) if "group" in frame.columns else frame.index.astype(str))
    return split_by_group(keyed, fractions, seed=seed, labels=[LABEL], group_col="_unit").drop(columns="_unit")


def detect_dataset(rows: pd.DataFrame, root: Path, spec, augment: TrainAugment | None = None):
    """Manifest rows as samples ``{"image": [3, H, W] normalised, "label": [1] (Fake), "meta"}``; ``augment``
    works on the decoded uint8 image before preprocessing."""
    from loupe.core.data import ManifestDataset
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    change = augment if augment is not None else as_rgb8
    return ManifestDataset(rows.reset_index(drop=True), [LABEL], root=root, transform=lambda a, m: prep(change(a)))


class NativeCrops(torch.utils.data.Dataset):
    """``crops`` random ``size`` px crops of each image at its own resolution (no resampling: the pixels a detector
    reads), with a random horizontal flip, re-drawn every epoch; decoded once and kept (uint8)."""

    def __init__(self, paths: list[Path], size: int, crops: int, spec):
        from loupe.core.transforms import ModelInput

        self.paths, self.size, self.crops, self.prep = paths, size, crops, ModelInput(spec)
        self.augment = TrainAugment(AugmentConfig(downscale_p=0, blur_p=0, jpeg_p=0), size)
        self._decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths) * self.crops

    def __getitem__(self, i: int) -> dict[str, Any]:
        from loupe.core.io import read_any

        k = i // self.crops
        if k not in self._decoded:
            self._decoded[k] = as_rgb8(read_any(self.paths[k]).array)
        return {"image": self.prep(self.augment(self._decoded[k])), "label": torch.zeros(0), "meta": {"index": i}}
