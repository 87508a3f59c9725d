"""Tissue and quality control on brightfield H&E, with scikit-image: what is tissue, what is pen, what is blurred.

- `tissue_mask(rgb)`: Otsu on saturation (capped, so a field that is all tissue is not split in two) and on
  optical density, pen ink removed, holes filled, specks below a minimum area dropped.
- `pen_mask(rgb)`: the blue, green and red markers pathologists draw on slides — hue bands of strongly saturated
  ink away from the pink-to-purple of H&E (red ink is told from eosin by its saturation).
- `tile_qc(tile)`: tissue fraction, pen fraction and sharpness (variance of the Laplacian) of one tile, and the
  reason it is excluded, if it is.
- `mask_geojson(mask, scale)`: the mask's outlines as a GeoJSON FeatureCollection of polygons in level-0 pixels
  (QuPath and most viewers open it).

Thresholds were set on histolab's labelled fixture tiles (tissue / no tissue / pen) and TCGA tiles; each is a
parameter of `QCConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QCConfig:
    """``min_tissue``: tissue fraction a tile needs; ``max_pen``: pen fraction it may have; ``min_sharpness``:
    variance of the Laplacian of the grey tile (0..1 intensities, at most 224 px) below which it is blurred (sharp
    H&E tiles measured 0.015-0.09 at 64-224 px, the same tiles blurred by a Gaussian of 1.5-2 px at most 0.0021);
    ``min_area``: smallest tissue region kept in the slide mask, as a fraction of the thumbnail."""

    min_tissue: float = 0.5
    max_pen: float = 0.03
    min_sharpness: float = 0.005
    min_area: float = 0.0005
    max_saturation_threshold: float = 0.15

    def problems(self) -> list[str]:
        bad = [k for k in ("min_tissue", "max_pen", "min_area") if not 0.0 <= getattr(self, k) <= 1.0]
        return [f"qc.{k} must be a fraction in [0, 1]" for k in bad]


def _hsv(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    return rgb2hsv(np.asarray(rgb)[..., :3])


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or red marker ink  # [H, W] bool."""
    hsv = _hsv(rgb)
    hue, sat = hsv[..., 0], hsv[..., 1]
    blue = (hue > 0.5) & (hue < 0.7) & (sat > 0.35)
    green = (hue > 0.15) & (hue < 0.5) & (sat > 0.2)
    red = ((hue > 0.955) | (hue < 0.04)) & (sat > 0.65)  # eosin: pinker (hue ~0.94) and less saturated than ink
    return blue | green | red


def tissue_mask(rgb: np.ndarray, cfg: QCConfig = QCConfig()) -> np.ndarray:
    """Tissue pixels of a slide thumbnail (or any RGB field), pen ink excluded  # [H, W] bool."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_objects

    a = np.asarray(rgb)[..., :3]
    sat = _hsv(a)[..., 1]
    od = -np.log((a.astype(np.float32) + 1.0) / 256.0).mean(-1)  # optical density, 0 for white glass
    t_sat = threshold_otsu(sat) if sat.max() > sat.min() else 1.0
    t_sat = float(np.clip(t_sat, 0.04, cfg.max_saturation_threshold))
    t_od = float(np.clip(threshold_otsu(od) if od.max() > od.min() else 1.0, 0.05, 0.25))
    ink = pen_mask(a)
    mask = (sat > t_sat) & (od > t_od) & ~ink
    mask = ndi.binary_fill_holes(closing(mask, disk(2))) & ~ink  # closing and filling must not bring ink back
    min_px = max(1, int(cfg.min_area * mask.size))
    return remove_small_objects(mask, max_size=min_px) if mask.any() else mask


def sharpness(tile: np.ndarray) -> float:
    """Variance of the Laplacian of the grey tile (larger tiles first reduced to 224 px; smaller ones are never
    enlarged, which would blur them)."""
    from PIL import Image
    from skimage.color import rgb2gray
    from skimage.filters import laplace

    img = Image.fromarray(np.asarray(tile)[..., :3])
    if max(img.size) > 224:
        img = img.resize((224, 224), Image.Resampling.BOX)
    return float(laplace(rgb2gray(np.asarray(img))).var())


@dataclass(frozen=True)
class TileQC:
    tissue: float
    pen: float
    sharpness: float
    excluded: str | None  # why the tile is left out (None: it is kept)

    def meta(self) -> dict[str, float]:
        return {"tissue": round(self.tissue, 4), "pen": round(self.pen, 4), "sharpness": round(self.sharpness, 6)}


def tile_qc(tile: np.ndarray, cfg: QCConfig = QCConfig()) -> TileQC:
    """Quality of one RGB tile; ``excluded`` names the first rule it breaks: background, pen, blurred."""
    a = np.asarray(tile)[..., :3]
    sat = _hsv(a)[..., 1]
    pen = float(pen_mask(a).mean())
    tissue = float(((sat > 0.08) & ~pen_mask(a)).mean())
    sharp = sharpness(a) if tissue >= cfg.min_tissue else 0.0
    reason = None
    if pen > cfg.max_pen:
        reason = f"ink: pen or marking dye ({pen:.0%} of the tile)"
    elif tissue < cfg.min_tissue:
        reason = f"background ({tissue:.0%} tissue, {cfg.min_tissue:.0%} needed)"
    elif sharp < cfg.min_sharpness:
        reason = f"blurred (sharpness {sharp:.5f} < {cfg.min_sharpness})"
    return TileQC(tissue, pen, sharp, reason)


def mask_geojson(mask: np.ndarray, scale: float, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mask's outer outlines as GeoJSON polygons in level-0 pixels (mask pixel = level-0 pixel x ``scale``)."""
    from skimage.measure import approximate_polygon, find_contours

    features = []
    padded = np.pad(mask.astype(np.uint8), 1)
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour - 1, tolerance=1.0)
        if len(contour) < 4:
            continue
        ring = [[round(float(x) / scale, 1), round(float(y) / scale, 1)] for y, x in contour]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"},
                                        **(properties or {})}})  # fmt: skip
    return {"type": "FeatureCollection", "features": features}


def geojson_text(mask: np.ndarray, scale: float) -> str:
    return json.dumps(mask_geojson(mask, scale))
