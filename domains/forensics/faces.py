"""Faces in a picture or a video frame: OpenCV's bundled Haar frontal-face cascade, offline and deterministic.

`detect_faces` finds every frontal face of at least ``min_face`` pixels, largest first, each with the cascade's
level weight as a score; `square_crop` turns a face box into the square the model sees, with a margin around the
face, kept inside the frame. Faces are **not aligned** (no eye-based rotation): a crop is an axis-aligned square,
so a tilted head reaches the model tilted. The Haar cascade misses profiles and strongly rotated faces; a frame
where it finds none is reported as such by the caller, never silently dropped.

Coordinates are ``(x, y, width, height)`` in the pixels of the image passed in (a video frame's pixels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from loupe.core.errors import ConfigError, LoupeError

Region = tuple[int, int, int, int]  # x, y, width, height

CASCADE = "haarcascade_frontalface_default.xml"
#: Detection runs on a grey copy whose longer side is at most this many pixels (a 1080p frame at full size costs
#: ~4x the time and finds the same faces); boxes are scaled back to the image's pixels.
DETECT_SIDE = 640
#: The cascade's window: no face smaller than this (in detection pixels) can be found.
_WINDOW = 24
_SCALE_FACTOR = 1.1
_MIN_NEIGHBOURS = 5


@dataclass(frozen=True)
class Face:
    """A face box in image pixels; ``score`` the cascade's level weight for it (uncalibrated, not a probability:
    higher means the last stage accepted it more surely; true faces mostly score 3-12, doubtful boxes near 0)."""

    box: Region
    score: float

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


@dataclass(frozen=True)
class FaceConfig:
    """``min_face``: the smallest face side to report, in image pixels (faces smaller than the cascade window at
    the detection size, ``24 * longer side / 640`` pixels, cannot be found anyway); ``max_faces``: keep the largest
    N faces, 0 = all; ``margin``: fraction of the face box's side added on each side of the crop (0.2 → a square
    1.4 times the face)."""

    min_face: int = 40
    max_faces: int = 0
    margin: float = 0.2

    def problems(self) -> list[str]:
        out = []
        if self.min_face < 1:
            out.append(f"min_face must be >= 1 pixel, got {self.min_face}")
        if self.max_faces < 0:
            out.append(f"max_faces must be >= 0 (0 = every face), got {self.max_faces}")
        if not 0.0 <= self.margin <= 2.0:
            out.append(f"margin must be in [0, 2] (a fraction of the face box), got {self.margin}")
        return out


@functools.lru_cache(maxsize=1)
def cascade() -> Any:
    """The bundled frontal-face cascade, loaded once per process (reader workers each load their own)."""
    import cv2

    path = f"{cv2.data.haarcascades}{CASCADE}"
    clf = cv2.CascadeClassifier(path)
    if clf.empty():
        raise LoupeError(
            f"OpenCV's Haar cascade {CASCADE} could not be loaded from {path}; reinstall opencv-python-headless 4.x "
            f"(`pip install 'opencv-python-headless>=4.9,<5'`: the 5.x wheels ship no cascades)"
        )
    return clf


def to_gray8(image: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    """``image`` (``[H, W]`` / ``[H, W, C]`` grey or RGB(A), integer pixels of ``bit_depth`` bits (default: the
    dtype's) or floats in 0..1, as the readers return it) as ``uint8`` grey ``[H, W]`` (ITU-R 601 luma)."""
    import cv2

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (2, 4):  # alpha dropped
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.dtype == np.uint8 and bit_depth in (None, 8):
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY) if a.ndim == 3 else a
    if np.issubdtype(a.dtype, np.integer):
        f = a.astype(np.float32) / float(2 ** (bit_depth or np.iinfo(a.dtype).bits) - 1)
    else:
        f = np.nan_to_num(a.astype(np.float32))
    if f.ndim == 3:
        f = f @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(f * 255.0), 0, 255).astype(np.uint8)


def detect_faces(image: np.ndarray, cfg: FaceConfig = FaceConfig(), bit_depth: int | None = None) -> list[Face]:
    """Frontal faces in ``image`` (see `to_gray8` for what it may be), largest first, at most ``cfg.max_faces``."""
    import cv2

    if cfg.problems():
        raise ConfigError(cfg.problems(), source="face detection")
    gray = to_gray8(image, bit_depth)
    h, w = gray.shape
    scale = min(1.0, DETECT_SIDE / max(h, w))
    small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = cv2.equalizeHist(small)  # dim or washed-out frames: the cascade's features compare local contrasts
    side = max(_WINDOW, int(cfg.min_face * scale))
    if side > min(small.shape):
        return []
    boxes, _, weights = cascade().detectMultiScale3(
        small, _SCALE_FACTOR, _MIN_NEIGHBOURS, minSize=(side, side), outputRejectLevels=True
    )
    faces = []
    for (x, y, bw, bh), wt in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1), strict=True):
        box = _clip((round(x / scale), round(y / scale), round(bw / scale), round(bh / scale)), w, h)
        if min(box[2], box[3]) >= cfg.min_face:
            faces.append(Face(box, round(float(wt), 4)))
    faces.sort(key=lambda f: (-f.area, -f.score, f.box))
    return faces[: cfg.max_faces] if cfg.max_faces else faces


def square_crop(box: Region, width: int, height: int, margin: float) -> Region:
    """The square around ``box`` with ``margin`` x its longer side added on each side, moved (not cut) to lie
    inside the ``width`` x ``height`` frame; only a square larger than the frame is cut to the frame's shorter
    side."""
    x, y, bw, bh = box
    side = min(round(max(bw, bh) * (1.0 + 2.0 * margin)), width, height)
    cx, cy = x + bw / 2.0, y + bh / 2.0
    x0 = int(min(max(0, round(cx - side / 2.0)), width - side))
    y0 = int(min(max(0, round(cy - side / 2.0)), height - side))
    return x0, y0, int(side), int(side)


def crop(image: np.ndarray, region: Region) -> np.ndarray:
    """The ``region`` of ``image`` (a view, channels kept)."""
    x, y, w, h = region
    return image[y : y + h, x : x + w]


def _clip(box: Region, width: int, height: int) -> Region:
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    return x0, y0, max(0, min(width, x + w) - x0), max(0, min(height, y + h) - y0)
