"""Transforms derived from a `WeightSpec`: small pure callables over arrays and tensors.

``ModelInput(spec)`` turns what the readers return (uint8/uint16 PNG/JPEG/TIFF arrays, float 0..1 DICOM arrays,
grey or RGB(A), HxW or HxWxC) into the normalised ``[C, H, W]`` float tensor the model was trained on. It is the
only path from pixels to a model, for training, evaluation and scoring alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loupe.core.errors import UnsupportedInputError
from loupe.core.models.spec import WeightSpec

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def to_unit_float(array: np.ndarray, bit_depth: int | None = None) -> torch.Tensor:
    """Scale intensities to 0..1: integers by their bit depth (default: the dtype's range), floats clipped.

    Returns ``[C, H, W]`` float32 (C = 1 for grey, alpha dropped).
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise UnsupportedInputError(f"expected an HxW or HxWxC image with 1-4 channels, got shape {a.shape}")
    if a.shape[2] in (2, 4):  # grey+alpha / RGBA: drop alpha
        a = a[:, :, :-1]
    if np.issubdtype(a.dtype, np.integer):
        bits = bit_depth or np.iinfo(a.dtype).bits
        t = torch.from_numpy(a.astype(np.float32)) / float(2**bits - 1)
    elif np.issubdtype(a.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    elif a.dtype == bool:
        t = torch.from_numpy(a.astype(np.float32))
    else:
        raise UnsupportedInputError(f"unsupported pixel type {a.dtype}; expected integer or float pixels")
    return t.clamp_(0.0, 1.0).permute(2, 0, 1).contiguous()  # [C, H, W]


def match_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey → RGB by repetition, RGB → grey by ITU-R 601 luma  # [C_out, H, W]."""
    if t.shape[0] == channels:
        return t
    if channels == 3 and t.shape[0] == 1:
        return t.expand(3, -1, -1).contiguous()
    if channels == 1 and t.shape[0] == 3:
        return (t * _LUMA).sum(0, keepdim=True)
    raise UnsupportedInputError(f"cannot convert {t.shape[0]} channels to {channels}")


def resize(t: torch.Tensor, size: tuple[int, int], mode: str, interpolation: str) -> torch.Tensor:
    """``squash`` resizes to ``size``; ``shorter_side_crop`` resizes the shorter side then centre-crops;
    ``center_crop`` takes the central ``size`` pixels as they are (no resampling: the pixel statistics a forensic
    detector reads survive), resizing the shorter side up only when the image is smaller than ``size``."""
    h, w = t.shape[-2:]
    if mode == "center_crop":
        scale = max(1.0, size[0] / h, size[1] / w)
        target = (max(size[0], round(h * scale)), max(size[1], round(w * scale))) if scale > 1 else (h, w)
    elif mode == "shorter_side_crop":
        scale = max(size[0] / h, size[1] / w)
        target = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    else:
        target = size
    if (h, w) != target:
        aa = interpolation != "nearest"
        t = F.interpolate(
            t[None], size=target, mode=interpolation, antialias=aa, align_corners=None if not aa else False
        )[0]
    if target != size:
        top, left = (target[0] - size[0]) // 2, (target[1] - size[1]) // 2
        t = t[:, top : top + size[0], left : left + size[1]]
    return t


@dataclass(frozen=True)
class ModelInput:
    """Array (as read) → normalised model input ``[C, H, W]``, exactly as the spec says."""

    spec: WeightSpec

    def __call__(self, array: np.ndarray | torch.Tensor, bit_depth: int | None = None) -> torch.Tensor:
        t = array if isinstance(array, torch.Tensor) else to_unit_float(array, bit_depth)
        t = match_channels(t, self.spec.in_chans)
        t = resize(t, tuple(self.spec.input_size[1:]), self.spec.resize_mode, self.spec.interpolation)
        t = t.clamp(0.0, 1.0)  # bicubic overshoot
        mean = torch.tensor(self.spec.mean).view(-1, 1, 1)
        std = torch.tensor(self.spec.std).view(-1, 1, 1)
        return (t - mean) / std
