"""Scoring units: what one input file becomes before a model sees it.

A domain's unit reader turns one file into a `FileUnits`: the file's non-identifying metadata, its coordinate
frame, and an iterator of *units* — the whole image (chest film), tiles with their region and level (slide),
frames and face crops with their time and box (video). Each unit carries its model-ready tensor; a unit that
cannot be read is a `UnitFailure` (recorded as a failed unit row, the file goes on). Readers run where the data
is read (DataLoader workers, Ray actors) and yield units lazily, so a slide of 50,000 tiles never sits in memory.

Coordinates: ``region`` is ``(x, y, width, height)`` in the file's frame — level-0 pixels of a slide, pixels of
an image or a video frame — so unit results and masks can be placed back on the file at any zoom. ``box`` is a
crop inside its frame (a face), in the same pixels; ``time_s`` is a video time in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loupe.core.models.spec import WeightSpec

Region = tuple[int, int, int, int]  # x, y, width, height


@dataclass
class UnitInfo:
    """Where a unit sits in its file (every field optional; what a domain has, it fills)."""

    index: int
    kind: str = "image"  # image | tile | frame | face | ...
    region: Region | None = None
    level: int | None = None
    frame_index: int | None = None
    time_s: float | None = None
    box: Region | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # non-identifying unit facts (tissue fraction, face score)


@dataclass
class Unit:
    """A unit ready for the model: ``image`` ``[C, H, W]`` exactly as the weight spec's preprocessing makes it."""

    image: torch.Tensor
    info: UnitInfo


@dataclass
class UnitFailure:
    """A unit that could not be read (``status`` ``failed``) or that quality control leaves out (``excluded``:
    background, pen, blur); ``reason`` is one line naming what was wrong."""

    reason: str
    info: UnitInfo
    status: str = "failed"


@dataclass
class FileArtifact:
    """Something a reader makes once per file for the reviewer (a slide's thumbnail, its tissue mask, outlines):
    ``data`` is an image array (``uint8`` RGB / grey, or float values in 0..1) or text; ``frame`` places it on the
    file (``{"space": "file", "scale": s}``); ``suffix`` the file type (``.png``, ``.geojson``)."""

    kind: str
    data: Any
    frame: dict[str, Any]
    suffix: str = ".png"


@dataclass
class FileUnits:
    """What a unit reader returns for one file.

    ``meta``: the reader's metadata (filtered through `loupe.core.io.safe_meta` before it is stored);
    ``frame``: the file's coordinate frame, ``{"width": W, "height": H}`` in pixels (level 0 for slides);
    ``units``: the units, produced lazily; ``artifacts``: per-file things to store (see `FileArtifact`).
    """

    meta: dict[str, Any]
    frame: dict[str, Any] | None
    units: Iterable[Unit | UnitFailure]
    artifacts: list[FileArtifact] = field(default_factory=list)


UnitReader = Callable[[Path, WeightSpec, "dict[str, Any] | None"], FileUnits]  # (file, spec, unit options)


def input_region(spec: WeightSpec, height: int, width: int) -> Region:
    """The part of an ``height`` x ``width`` image that the spec's resize shows the model (all of it for
    ``squash``, the centre crop for ``shorter_side_crop`` and ``center_crop``), as ``(x, y, w, h)`` in image
    pixels."""
    if spec.resize_mode == "squash":
        return 0, 0, width, height
    th, tw = spec.input_size[1:]
    scale = max(th / height, tw / width)
    if spec.resize_mode == "center_crop":
        scale = max(1.0, scale)
    ch, cw = min(height, round(th / scale)), min(width, round(tw / scale))
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def single_image_units(path: Path, spec: WeightSpec, options: dict[str, Any] | None = None) -> FileUnits:
    """The default unit reader: one unit, the whole image (first frame of a multi-frame DICOM), read by content
    (at a reduced resolution when the file has many more pixels than the model input) and preprocessed as the spec
    says when the unit is taken (after the caller has checked the model's scope on
    ``meta``: an out-of-scope file is refused before any preprocessing)."""
    from loupe.core.io import DecodeTarget, read_any

    # decoded at no more resolution than the model input needs (JPEG 2000 levels, JPEG DCT scaling, averaging)
    img = read_any(path, target=DecodeTarget.for_model(spec.input_size, spec.resize_mode))
    array = img.array
    if array.ndim >= 3 and img.meta.get("frames", 1) > 1:
        array = array[0]
    height, width = int(array.shape[0]), int(array.shape[1])
    if img.meta.get("decode_scale", 1.0) != 1.0:  # the frame is the file's own pixels, not the reduced decode's
        height, width = (int(v) for v in img.meta["original_size"][:2])
        if img.meta.get("orientation_applied") and img.meta.get("exif_orientation") in (5, 6, 7, 8):
            height, width = width, height
    info = UnitInfo(index=0, kind="image", region=input_region(spec, height, width))
    bits = img.meta.get("bits_stored") or img.meta.get("bit_depth")
    return FileUnits(meta=dict(img.meta), frame={"width": width, "height": height},
                     units=_prepared(array, bits, spec, info))  # fmt: skip


def _prepared(array: Any, bits: int | None, spec: WeightSpec, info: UnitInfo) -> Iterator[Unit]:
    from loupe.core.transforms import ModelInput

    yield Unit(ModelInput(spec)(array, bits), info)
