"""``ManifestDataset``: manifest rows in, ``{"image", "label", "meta"}`` samples out.

``image`` is whatever ``transform(array, meta)`` returns (default: a float tensor ``[C, H, W]`` in [0, 1], or
``[F, C, H, W]`` for multi-frame DICOM); ``label`` is a float tensor ``[L]`` of 1 / 0 / NaN (NaN = unknown,
masked in the loss); ``meta`` holds the row's path, group, split and ``meta_*`` values plus the reader's metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from loupe.core.data.manifest import GROUP, META_PREFIX, PATH, SPLIT
from loupe.core.errors import LoupeError
from loupe.core.io import LoadedImage, read_any

log = logging.getLogger(__name__)
Transform = Callable[[np.ndarray, dict[str, Any]], Any]


def to_float_tensor(array: np.ndarray, meta: dict[str, Any]) -> torch.Tensor:
    """What a reader returns → float ``[C, H, W]`` in [0, 1] (``[F, C, H, W]`` for multi-frame files), through
    `loupe.core.transforms.to_unit_float`: integers divided by the significant bits (``meta["bits_stored"]`` /
    ``meta["bit_depth"]``), alpha dropped, floats clipped — the one pixel-to-float path of the suite."""
    from loupe.core.transforms import to_unit_float

    bits = meta.get("bits_stored") or meta.get("bit_depth")
    if int(meta.get("frames", 1)) > 1:
        return torch.stack([to_unit_float(frame, bits) for frame in np.asarray(array)])
    return to_unit_float(array, bits)


class ManifestDataset(Dataset):
    """Samples from a manifest; one unreadable file raises, or with ``on_error="record"`` yields a failed sample.

    A failed sample has an empty image, all-NaN labels, ``meta["ok"] = False`` and ``meta["error"]`` (the
    message), so a DataLoader keeps going; collate with `collate_samples`, which sets failed samples aside.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        labels: Sequence[str],
        *,
        root: str | Path | None = None,
        transform: Transform = to_float_tensor,
        reader: Callable[[Path], LoadedImage] = read_any,
        on_error: Literal["raise", "record"] = "raise",
    ):
        missing = [c for c in (PATH, *labels) if c not in manifest.columns]
        if missing:
            raise LoupeError(f"manifest lacks column(s) {missing}; align labels first with align_labels()")
        if on_error not in ("raise", "record"):
            raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'record'")
        self.frame = manifest.reset_index(drop=True)
        self.labels = list(labels)
        self.root = Path(root) if root is not None else Path(".")
        self.transform, self.reader, self.on_error = transform, reader, on_error
        values = self.frame[self.labels].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        self._targets = torch.tensor(values)  # [N, L]; a copy: pandas may hand back a read-only view
        self._meta_columns = [c for c in self.frame.columns if c in (GROUP, SPLIT) or str(c).startswith(META_PREFIX)]

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.frame.iloc[index]
        path = Path(str(row[PATH]))
        path = path if path.is_absolute() else self.root / path
        meta: dict[str, Any] = {"index": int(index), "path": str(path), "ok": True}
        meta |= {c: _plain(row[c]) for c in self._meta_columns}
        try:
            loaded = self.reader(path)
            image = self.transform(loaded.array, loaded.meta)
        except LoupeError as exc:
            if self.on_error == "raise":
                raise
            log.warning("sample %d failed: %s", index, exc)
            meta |= {"ok": False, "error": str(exc)}
            return {"image": torch.empty(0), "label": torch.full((len(self.labels),), float("nan")), "meta": meta}
        meta["image"] = {k: v for k, v in loaded.meta.items() if k != "path"}
        return {"image": image, "label": self._targets[index].clone(), "meta": meta}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if value is pd.NA else value


def collate_samples(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples' images and labels; metadata stays a list; failed samples go to ``"failed"``."""
    good = [s for s in batch if s["meta"].get("ok", True)]
    return {
        "image": torch.stack([s["image"] for s in good]) if good else torch.empty(0),
        "label": torch.stack([s["label"] for s in good]) if good else torch.empty(0),
        "meta": [s["meta"] for s in good],
        "failed": [s["meta"] for s in batch if not s["meta"].get("ok", True)],
    }
