"""Artifacts stored as data beside the tables: probability masks, Grad-CAM maps, and the overlay pictures.

Maps are 16-bit grey PNGs whose value / 65535 is the probability (mask) or the normalised Grad-CAM weight, each
referenced from its row's ``artifacts`` JSON with the coordinate frame it lives in, so the dashboard can place it
on the file at any zoom::

    {"kind": "mask", "path": "preds.parquet.artifacts/<id>-mask.png", "encoding": "png16/65535",
     "frame": {"space": "file", "width": W, "height": H, "scale": s}}      # PNG pixel (i, j) = file pixel (i/s, j/s)
    {"kind": "gradcam", "path": ..., "label": "Pneumonia", "unit": 0,
     "frame": {"space": "region", "region": [x, y, w, h]}}                 # the PNG spans that region of the file

Paths are relative to the folder of the predictions table; file names carry the content identity, never the
input's name (which may hold a patient's name).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loupe.core.io.maps import ENCODING, save_map

#: Stitched file-level masks are stored with at most this many pixels on their longer side.
MASK_MAX_SIDE = 1024


def file_key(content_id: str | None) -> str:
    """A short, name-free key for a file's artifacts: the first 16 hex digits of its content identity."""
    return (content_id or "unknown").split(":")[-1][:16]


class MaskCanvas:
    """Unit masks placed on one file's frame, averaged where units overlap; stored downsampled to
    `MASK_MAX_SIDE`."""

    def __init__(self, width: int, height: int):
        self.width, self.height = int(width), int(height)
        self.scale = min(1.0, MASK_MAX_SIDE / max(self.width, self.height, 1))
        h, w = max(1, math.ceil(self.height * self.scale)), max(1, math.ceil(self.width * self.scale))
        self.sum = np.zeros((h, w), np.float32)
        self.count = np.zeros((h, w), np.float32)

    def add(self, mask: np.ndarray, region: tuple[int, int, int, int]) -> None:
        """``mask`` ``[h, w]`` (probabilities over the unit's input) covers ``region`` (x, y, w, h) of the file."""
        x, y, w, h = region
        s = self.scale
        x0, y0 = max(0, round(x * s)), max(0, round(y * s))
        x1, y1 = min(self.sum.shape[1], round((x + w) * s)), min(self.sum.shape[0], round((y + h) * s))
        if x1 <= x0 or y1 <= y0:
            return
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        resized = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False, antialias=True)
        self.sum[y0:y1, x0:x1] += resized[0, 0].numpy()
        self.count[y0:y1, x0:x1] += 1.0

    def result(self) -> np.ndarray:
        return np.where(self.count > 0, self.sum / np.maximum(self.count, 1.0), 0.0).astype(np.float32)

    def save(self, dst: Path, rel: str, threshold: float) -> dict[str, Any]:
        """Write the mask; returns its artifact reference (with the area above ``threshold`` and the peak)."""
        m = self.result()
        save_map(m, dst)
        covered = self.count > 0
        return {
            "kind": "mask",
            "path": rel,
            "encoding": ENCODING,
            "frame": {"space": "file", "width": self.width, "height": self.height, "scale": self.scale},
            "threshold": threshold,
            "area_fraction": float((m[covered] >= threshold).mean()) if covered.any() else 0.0,
            "max": float(m.max()) if m.size else 0.0,
        }


def grid_heatmap(width: int, height: int, regions: list[tuple[int, int, int, int]], values: list[float]) -> MaskCanvas:
    """Each region filled with its value (averaged where regions overlap) on a ``width`` x ``height`` frame."""
    canvas = MaskCanvas(width, height)
    for region, v in zip(regions, values, strict=True):
        canvas.add(np.full((1, 1), v, np.float32), region)
    return canvas


def overlay_picture(model_input: np.ndarray, cam: np.ndarray, dst: Path, min_side: int = 256) -> None:
    """The unit as the model saw it (``[H, W, 3]`` in 0..1) beside it under the Grad-CAM map, as one RGB PNG."""
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    overlay = show_cam_on_image(model_input, cam.astype(np.float32), use_rgb=True, image_weight=0.6)
    img = Image.fromarray(np.concatenate([(model_input * 255).round().astype(np.uint8), overlay], axis=1))
    if min(img.size) < min_side:
        scale = min_side / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BILINEAR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst)


def safe_label(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def encoding_of(artifact) -> str:
    """How a reader's artifact is stored: ``text`` (GeoJSON...), ``png16/65535`` (values), ``png8`` (a picture or a
    0/255 mask)."""
    if isinstance(artifact.data, str):
        return "text"
    return ENCODING if np.issubdtype(np.asarray(artifact.data).dtype, np.floating) else "png8"


def save_file_artifact(artifact, dst: Path) -> None:
    """Write a reader's `FileArtifact`: text as is, float maps as 16-bit PNGs, uint8 / bool images as 8-bit PNGs."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(artifact.data, str):
        dst.write_text(artifact.data)
        return
    a = np.asarray(artifact.data)
    if np.issubdtype(a.dtype, np.floating):
        save_map(a, dst)
    else:
        Image.fromarray(a.astype(np.uint8) * (255 if a.dtype == bool else 1)).save(dst)
