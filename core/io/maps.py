"""Value maps (masks, heatmaps, Grad-CAM) as 16-bit grey PNGs: value / 65535 is the stored value in 0..1.

Lossless, viewable in any image viewer, and fine enough (1/65535) for probabilities; what the scoring artifacts
and the review cases read and write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ENCODING = "png16/65535"


def save_map(values: np.ndarray, dst: str | Path) -> None:
    """A 2-D array of values in [0, 1] (NaN → 0) as a 16-bit grey PNG."""
    from PIL import Image

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    a = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    Image.fromarray(np.round(a * 65535).astype(np.uint16)).save(dst)


def load_map(path: str | Path) -> np.ndarray:
    """A map written by `save_map` (or an 8-bit mask), back in [0, 1] (float32)."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    top = 255.0 if a.dtype == np.uint8 else 65535.0  # 8-bit masks (0 / 255) read as 0 / 1 too
    return a.astype(np.float32) / top
