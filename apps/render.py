"""Pixels for the screen: a case's base layer with its overlays blended in, placed by their coordinate frames.

Plain numpy (and matplotlib's colour maps), no streamlit, so it is tested like any library code. Everything works
on the downsampled display copy of the layer (`loupe.core.review.render_layer`); stored files are never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from loupe.core.review import Layer, Overlay, apply_window


@dataclass(frozen=True)
class View:
    """How to show a case: window (centre, width) for films, which overlays, how opaque, which part (zoom)."""

    window: tuple[float, float] | None = None
    overlays: tuple[str, ...] = ()
    opacity: float = 0.4
    zoom: float = 1.0
    center: tuple[float, float] = (0.5, 0.5)  # of the zoomed window, as fractions of the image width / height


def to_rgb(gray_or_rgb: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` floats in 0..1 → ``[H, W, 3]`` floats."""
    a = np.clip(np.asarray(gray_or_rgb, dtype=np.float32), 0.0, 1.0)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]


def colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    """Values in 0..1 → RGB ``[..., 3]`` through a matplotlib colour map (``reds`` is an alias of ``Reds``)."""
    import matplotlib

    name = {"reds": "Reds"}.get(colormap, colormap)
    cmap = matplotlib.colormaps[name] if name in matplotlib.colormaps else matplotlib.colormaps["inferno"]
    return np.asarray(cmap(np.clip(values, 0.0, 1.0)))[..., :3].astype(np.float32)  # a scalar gives a tuple


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 2-D float map resized (bilinear) to ``size`` = (width, height)."""
    img = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def place(overlay: Overlay, values: np.ndarray, frame: dict, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A map overlay on a display image of ``shape`` (H, W) showing a file of ``frame`` (W0 x H0 pixels): the
    values and the coverage mask, both ``[H, W]``."""
    h, w = shape
    out, covered = np.zeros((h, w), np.float32), np.zeros((h, w), bool)
    d = w / float(frame.get("width") or w)  # display pixels per file pixel
    space = overlay.frame.get("space")
    if space == "file":
        out[:], covered[:] = _resize(values, (w, h)), True
        return out, covered
    if space == "region" and overlay.frame.get("region"):
        x, y, rw, rh = overlay.frame["region"]
        x0, y0 = round(x * d), round(y * d)
        x1, y1 = min(w, max(x0 + 1, round((x + rw) * d))), min(h, max(y0 + 1, round((y + rh) * d)))
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = _resize(values, (x1 - x0, y1 - y0))
            covered[y0:y1, x0:x1] = True
    return out, covered


def compose(base: np.ndarray, layer: Layer, overlays: Sequence[tuple[Overlay, np.ndarray | None]], view: View):
    """The display image (uint8 RGB ``[H, W, 3]``): the base layer (windowed when it is a film), then each chosen
    overlay blended at ``view.opacity`` (maps where they cover, grid cells and boxes as outlined rectangles),
    then the zoom window cropped and enlarged."""
    gray = base if base.ndim == 2 else None
    if gray is not None and view.window is not None:
        base = apply_window(gray, *view.window)
    rgb = to_rgb(base)
    h, w = rgb.shape[:2]
    frame = layer.frame or {"width": w, "height": h}
    for ov, values in overlays:
        if ov.name not in view.overlays:
            continue
        if values is not None:
            placed, covered = place(ov, values, frame, (h, w))
            color = colorize(placed, ov.colormap)
            alpha = view.opacity * covered[..., None]
            if ov.kind == "mask" and ov.threshold is not None:  # a mask shows where it is above its threshold
                alpha = alpha * (placed >= ov.threshold)[..., None]
            elif ov.kind == "heatmap":  # a heatmap fades out where it is low, so the anatomy under it stays visible
                alpha = alpha * placed[..., None]
            rgb = rgb * (1 - alpha) + color * alpha
        elif ov.cells:
            rgb = _cells(rgb, ov, frame, view.opacity)
    img = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return zoom(img, view.zoom, view.center)


def _cells(rgb: np.ndarray, ov: Overlay, frame: dict, opacity: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    d = w / float(frame.get("width") or w)
    fill = np.zeros_like(rgb)
    alpha = np.zeros((h, w, 1), np.float32)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for cell in ov.cells:
        x, y, cw, ch = cell["region"]
        x0, y0, x1, y1 = round(x * d), round(y * d), round((x + cw) * d), round((y + ch) * d)
        value = cell.get("value")
        if value is not None and ov.kind == "grid":
            fill[y0:y1, x0:x1] = colorize(np.array(value), ov.colormap)
            alpha[y0:y1, x0:x1] = opacity
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 255, 0) if ov.kind == "boxes" else
                       (255, 255, 255))  # fmt: skip
    outlined = np.asarray(img, dtype=np.float32) / 255.0
    return outlined * (1 - alpha) + fill * alpha


def zoom(img: np.ndarray, factor: float, center: tuple[float, float]) -> np.ndarray:
    """The ``1 / factor`` part of ``img`` around ``center`` (fractions), enlarged back to ``img``'s size."""
    if factor <= 1.0:
        return img
    h, w = img.shape[:2]
    zh, zw = max(1, round(h / factor)), max(1, round(w / factor))
    cy, cx = center[1] * h, center[0] * w
    top = int(min(max(0, cy - zh / 2), h - zh))
    left = int(min(max(0, cx - zw / 2), w - zw))
    crop = Image.fromarray(img[top : top + zh, left : left + zw])
    return np.asarray(crop.resize((w, h), Image.Resampling.NEAREST))
