"""A DICOM file's stored pixel values, decoded at no more resolution than the model needs and within a memory budget.

`decode_pixels` returns what ``ds.pixel_array`` returns (stored values, pydicom's dtype and layout), except that
with a `DecodeTarget` an image larger than the model input on both sides is decoded at 1/2^k of its resolution:

- JPEG 2000 (grey): OpenJPEG decodes resolution level k alone (`loupe.core.io.j2k`), never the finer levels;
- JPEG baseline (8-bit grey): libjpeg's DCT scaling (Pillow's ``draft``), up to 1/8;
- anything else (native, RLE, JPEG-LS, lossless JPEG, colour): a full decode, then 2^k x 2^k block averages
  (after the BitsStored mask), so the display pipeline runs on the reduced image.

Before anything is allocated, the decode and the display pipeline that follows it (float64 copies) are checked
against the budget; a file that would exceed it is refused by name, with the fix. Each choice is a ``pipeline``
line, and the level is returned for ``meta["decode_scale"]``.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit

from loupe.core.io import dicom_lut, j2k
from loupe.core.io.common import (
    DECODE_BUDGET,
    DecodeTarget,
    box_reduce,
    check_decode_budget,
    decode_step,
    reduced,
)

log = logging.getLogger(__name__)

_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000, UID("1.2.840.10008.1.2.4.201"), UID("1.2.840.10008.1.2.4.203"))
#: Bytes per output value of the display pipeline after decoding (measured peaks): grey is rendered through float64
#: copies (modality LUT, VOI, inversion) into float32; colour is scaled in place in one float32 copy.
_RENDER_BYTES = {"gray": 32, "color": 4}


@dataclass
class Decoded:
    """Stored values (``ds.pixel_array``'s dtype and layout, possibly reduced), the pipeline lines of the decode,
    and the reduction level (0 = full resolution)."""

    array: np.ndarray
    steps: list[str] = field(default_factory=list)
    level: int = 0


def decode_pixels(
    path: Path,
    ds: Dataset,
    tsyntax: UID,
    frames: int,
    target: DecodeTarget | None,
    budget: int = DECODE_BUDGET,
    voi_index: int | None = 0,
) -> Decoded:
    """Decode the pixel data of ``ds`` (see the module docstring); raises `UnsupportedInputError` when the decode
    would exceed ``budget`` bytes, and lets codec errors through to the caller's boundary. ``voi_index`` is the
    renderer's: a grey image without a VOI window or LUT is displayed over its own min..max, which averaging
    changes, so it is decoded in full whenever that fits the budget."""
    rows, cols, spp = int(ds.Rows), int(ds.Columns), _int(ds.get("SamplesPerPixel"), 1)
    gray = str(ds.PhotometricInterpretation).strip() in dicom_lut.MONOCHROME
    level = target.reduction(rows, cols) if target is not None else 0
    steps = []
    if level and gray and not _has_voi(ds, voi_index):
        if _full_cost(ds, tsyntax, frames, 0, gray) <= budget:
            level = 0
            steps.append("decode: full resolution although the model needs fewer pixels (no VOI window or LUT: the "
                         "display range is the image's own min..max, which a reduced decode would change)")  # fmt: skip
        else:
            steps.append("decode: reduced to fit the decode budget; the min..max display range is the reduced image's")
    render = _render_cost(ds, frames, level, gray)
    out = None
    if level and gray and spp == 1 and tsyntax in _J2K_SYNTAXES:
        out = _j2k_reduced(path, ds, frames, level, target, (render, budget))
    elif level and gray and spp == 1 and tsyntax == JPEGBaseline8Bit and int(ds.BitsAllocated) == 8:
        out = _jpeg_reduced(path, ds, frames, level, target, (render, budget))
    if out is not None:
        out.steps[:0] = steps
        return out
    size = f"{frames} x " if frames > 1 else ""
    check_decode_budget(
        path, _full_cost(ds, tsyntax, frames, level, gray), f"the {size}{rows}x{cols} pixel data", budget
    )
    arr = ds.pixel_array
    if gray and not tsyntax.is_encapsulated:  # overlays and junk above BitsStored go before anything looks at values
        arr, step = dicom_lut.mask_bits_stored(arr, int(ds.BitsStored), _int(ds.get("PixelRepresentation"), 0) == 1)
        steps += [step] if step else []
    if level:
        arr = box_reduce(arr, level) if frames == 1 else np.stack([box_reduce(f, level) for f in arr])
        got = arr.shape[-3:-1] if spp > 1 else arr.shape[-2:]
        steps.append(decode_step("averaging after a full decode", level, (rows, cols), tuple(got), target))
    return Decoded(arr, steps, level)


def _has_voi(ds: Dataset, voi_index: int | None) -> bool:
    """Whether the renderer will display the image through the file's own VOI LUT or a valid window."""
    if voi_index is None:
        return False
    if ds.get("VOILUTSequence"):
        return True
    try:
        win = dicom_lut.find_window(ds, voi_index)
    except (IndexError, TypeError, ValueError):
        return True  # the renderer reports a bad index; the choice of resolution does not matter then
    return win is not None and dicom_lut.window_is_valid(win)


def _render_cost(ds: Dataset, frames: int, level: int, gray: bool) -> int:
    spp = _int(ds.get("SamplesPerPixel"), 1)
    values = frames * reduced(int(ds.Rows), level) * reduced(int(ds.Columns), level) * spp
    return values * _RENDER_BYTES["gray" if gray else "color"]


def _full_cost(ds: Dataset, tsyntax: UID, frames: int, level: int, gray: bool) -> int:
    """Bytes of a full decode by pydicom (the codec's buffer, the array and a colour conversion for compressed data;
    the array alone for native data) and of rendering at ``level``."""
    itemsize = max(1, -(-int(ds.BitsAllocated) // 8))
    values = frames * int(ds.Rows) * int(ds.Columns) * _int(ds.get("SamplesPerPixel"), 1)
    return values * itemsize * (3 if tsyntax.is_encapsulated else 1) + _render_cost(ds, frames, level, gray)


def _j2k_reduced(
    path: Path, ds: Dataset, frames: int, level: int, target: DecodeTarget, budget: tuple[int, int]
) -> Decoded | None:
    """JPEG 2000 at resolution level ``level`` (or the deepest all frames have); None to fall back to a full decode
    (no OpenJPEG library; colour; a codestream whose sign differs from Pixel Representation, which pydicom corrects
    bit by bit, a correction that only holds at full resolution)."""
    if not j2k.available():
        log.info("%s: no OpenJPEG library for reduced JPEG 2000 decoding; decoding in full", path.name)
        return None
    signed = _int(ds.get("PixelRepresentation"), 0) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{max(1, -(-int(ds.BitsAllocated) // 8))}")
    codestreams = list(generate_frames(ds.PixelData, number_of_frames=frames))
    heads = [j2k.read_header(c) for c in codestreams]
    if any(h.signed != signed or h.components != 1 for h in heads):
        return None
    level = min([level, *(h.levels for h in heads)])
    if level == 0:  # no wavelet levels to skip: pydicom decodes it as it is
        return None
    render, total = budget
    values = sum(reduced(h.rows, level) * reduced(h.columns, level) for h in heads)
    check_decode_budget(path, values * (8 + dtype.itemsize) + render, _what(ds, frames, level), total)
    info = np.iinfo(dtype)
    out = [np.clip(j2k.decode(c, level)[0][0], info.min, info.max).astype(dtype) for c in codestreams]
    arr = out[0] if frames == 1 else np.stack(out)
    step = decode_step("JPEG 2000 resolution level", level, (int(ds.Rows), int(ds.Columns)), arr.shape[-2:], target)
    return Decoded(arr, [step], level)


def _jpeg_reduced(
    path: Path, ds: Dataset, frames: int, level: int, target: DecodeTarget, budget: tuple[int, int]
) -> Decoded | None:
    """8-bit grey JPEG baseline by libjpeg's DCT scaling (1/2, 1/4, 1/8), averaged further past 1/8; None to fall
    back to pydicom when a frame is not what the header says."""
    from PIL import Image

    dct = min(level, 3)
    rows, cols = int(ds.Rows), int(ds.Columns)
    render, total = budget
    check_decode_budget(path, frames * reduced(rows, dct) * reduced(cols, dct) * 2 + render,
                        _what(ds, frames, dct), total)  # fmt: skip
    out = []
    for frame in generate_frames(ds.PixelData, number_of_frames=frames):
        with Image.open(io.BytesIO(frame), formats=["JPEG"]) as im:
            if im.mode != "L" or im.size != (cols, rows):
                return None
            im.draft("L", (max(1, cols >> dct), max(1, rows >> dct)))  # Pillow floors the ratio: ask the floor
            if im.size != (reduced(cols, dct), reduced(rows, dct)):
                return None
            out.append(box_reduce(np.asarray(im), level - dct))
    arr = out[0] if frames == 1 else np.stack(out)
    how = "JPEG DCT scaling" if dct == level else f"JPEG DCT scaling 1/{1 << dct} then averaging"
    return Decoded(arr, [decode_step(how, level, (rows, cols), arr.shape[-2:], target)], level)


def _what(ds: Dataset, frames: int, level: int) -> str:
    size = f"{frames} x " if frames > 1 else ""
    rows, cols = int(ds.Rows), int(ds.Columns)
    return f"the {size}{rows}x{cols} pixel data at 1/{1 << level} ({reduced(rows, level)}x{reduced(cols, level)})"


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
