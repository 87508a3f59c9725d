"""PNG / JPEG / TIFF reading that keeps native bit depth and applies EXIF orientation.

``read_image`` returns the native dtype (``uint8`` or ``uint16``; ``int32`` / ``float32`` only for such TIFFs),
channels-last: ``[H, W]`` grayscale, ``[H, W, 2]`` grayscale + alpha, ``[H, W, 3]`` RGB, ``[H, W, 4]`` RGBA.
Scaling to a model's range is the transforms' job, not the reader's.

Metadata keys (besides the common ``path``, ``source_format``, ``original_size``, ``frames``, ``intensity``,
``pipeline``): ``mode`` (Pillow's mode as stored), ``bit_depth`` (the bits that carry data, what scaling to 0..1
divides by: 1, 8, 10, 12, 14, 16 or 32), ``container_bit_depth`` (bits per sample as stored), ``bit_depth_source``
(a PNG sBIT chunk, the data's range, or the container; see `significant_bits`),
``channels``, ``color`` (``"gray"``, ``"gray+alpha"``, ``"rgb"``, ``"rgba"``), ``exif_orientation`` (1-8, 1 when
absent), ``orientation_applied`` (whether the pixels were rotated / flipped to honour it), ``pages`` (frames or
TIFF pages in the file; only the first is read), ``decode_scale`` (1 = every stored pixel; 1/2^k when a
`DecodeTarget` let the image be decoded at a reduced resolution).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps

from loupe.core.errors import LoupeError
from loupe.core.io.common import (
    DECODE_BUDGET,
    MAX_PIXELS,
    DecodeTarget,
    LoadedImage,
    box_reduce,
    check_decode_budget,
    check_pillow_guard,
    check_pixel_count,
    decode_step,
    input_error,
    open_source,
    reduced,
)
from loupe.core.io.sniff import IMAGE_FORMATS, sniff_format

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_EXIF_ORIENTATION = 0x0112
_COLOR = {1: "gray", 2: "gray+alpha", 3: "rgb", 4: "rgba"}
# Modes whose samples Pillow hands to numpy unchanged; every other mode is converted (and the conversion logged).
_NATIVE_MODES = {"L", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_CONVERT_TO = {"1": "L", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "La": "LA"}


#: The metadata keys of `read_image` that may be stored (an allowlist; the path is not on it).
SAFE_META_KEYS = frozenset(
    {
        "source_format", "original_size", "frames", "pages", "mode", "bit_depth", "container_bit_depth",
        "bit_depth_source", "channels", "color", "exif_orientation", "orientation_applied", "decode_scale",
        "intensity", "pipeline",
    }
)  # fmt: skip


def read_image(
    path: str | Path,
    *,
    apply_exif: bool = True,
    max_pixels: int = MAX_PIXELS,
    target: DecodeTarget | None = None,
    decode_budget: int = DECODE_BUDGET,
) -> LoadedImage:
    """Read the first frame of a PNG, JPEG or TIFF file, sniffed by content.

    ``apply_exif`` rotates / flips the pixels as the EXIF orientation tag says (what every photo viewer shows).
    ``target``: the model input the pixels are for; an image larger than it on both sides is decoded at 1/2^k of
    its resolution (JPEG by DCT scaling, others averaged right after decoding) with k the largest level that still
    covers the target (``meta["decode_scale"]``, and a ``pipeline`` line). ``decode_budget``: the most bytes the
    decode may take. Raises `UnsupportedInputError` naming the file, the problem and the fix for anything that is
    not a readable image of at most ``max_pixels`` values decodable within the budget.
    """
    p = Path(path)
    fmt = sniff_format(p)
    if fmt.startswith("dicom"):
        raise input_error(p, "is a DICOM file, not a PNG/JPEG/TIFF image", "read it with read_dicom() or read_any()")
    if fmt not in IMAGE_FORMATS:
        raise input_error(
            p, "is not a PNG, JPEG, TIFF or DICOM file (unrecognised first bytes)", "convert it to PNG or TIFF"
        )
    check_pillow_guard(p)
    try:
        with open_source(p) as fh:
            return _decode(p, fh, fmt, apply_exif=apply_exif, max_pixels=max_pixels, target=target,
                           budget=decode_budget)  # fmt: skip
    except LoupeError:
        raise
    except Image.DecompressionBombError as exc:
        raise input_error(
            p, f"refused as a decompression bomb ({exc})", "the header is corrupt or the image must be tiled"
        ) from exc
    except MemoryError as exc:
        raise input_error(
            p, "ran out of memory while decoding", "the file is corrupt or too large; re-export it"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - boundary: Pillow raises OSError, SyntaxError, ValueError, struct.error...
        reason = _STREAM_REPR.sub(repr(p.name), str(exc))  # Pillow names the stream it read; name the file
        raise input_error(
            p, f"cannot be decoded as {fmt.upper()} ({type(exc).__name__}: {reason})", _fix_for(exc)
        ) from exc


def _fix_for(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError):
        return "the file is truncated; re-export or re-download it"
    return "the file is corrupt or uses an unsupported variant; re-export it as PNG"


# Bytes per pixel of Pillow's image memory by mode (anything else: 4).
_PIL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Modes Pillow's `Image.reduce` averages; others (I;16) are averaged in numpy.
_PIL_REDUCES = {"L", "LA", "RGB", "RGBA", "I", "F"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
_STREAM_REPR = re.compile(r"<_io\.\w+ (?:object at 0x[0-9a-fA-F]+|name=[^>]*)>")


def _decode(
    path: Path, fh: BinaryIO, fmt: str, *, apply_exif: bool, max_pixels: int, target: DecodeTarget | None, budget: int
) -> LoadedImage:
    with Image.open(fh, formats=[_PIL_FORMAT[fmt]]) as im:
        width, height = im.size
        pages = int(getattr(im, "n_frames", 1) or 1)
        check_pixel_count(path, (height, width, len(im.getbands())), f"the {fmt.upper()} header", max_pixels)
        mode = im.mode
        pre = _exif_orientation(im) if fmt == "jpeg" else None  # JPEG's EXIF is in the header, before the scans
        level = _level(target, height, width, apply_exif and pre in _SWAPS_AXES)
        dct = _draft(im, level) if fmt == "jpeg" else 0
        # PNG / TIFF orientation is known once loaded: budget for the smaller of the two levels it may allow
        _check_budget(path, im, level if fmt == "jpeg" else _level(target, height, width, None), dct, budget)
        im.load()
        orientation = pre if fmt == "jpeg" else _exif_orientation(im)
        if fmt != "jpeg":  # averaged after orientation: the level is that of the displayed axes
            level = _level(target, height, width, apply_exif and orientation in _SWAPS_AXES)
        top = _top(im)  # the full-resolution data range decides the significant bits, not an averaged one
        pipeline = [f"frames: read frame 1 of {pages}"] if pages > 1 else []
        out = im
        if apply_exif and orientation not in (1, None):
            out = ImageOps.exif_transpose(im) or im
            pipeline.append(f"exif: orientation {orientation} applied")
        out, steps = _convert(out)
        array, bit_depth = _to_array(_reduce(out, level - dct), mode)
    pipeline += steps
    if level:
        shown = (width, height) if apply_exif and orientation in _SWAPS_AXES else (height, width)
        pipeline.append(decode_step(_reduced_by(level, dct), level, shown, array.shape[:2], target))
    if mode == "I" and array.dtype == np.uint16:
        pipeline.append("mode: I (32-bit) holds 16-bit values, kept as uint16")
    container = bit_depth
    bit_depth, source = significant_bits(path, fmt, array, bit_depth, top=top)
    if bit_depth != container:
        pipeline.append(f"bit depth: {bit_depth} significant bits of {container} stored ({source})")
    channels = 1 if array.ndim == 2 else int(array.shape[2])
    meta: dict[str, Any] = {
        "path": str(path),
        "source_format": fmt,
        "original_size": (height, width),
        "frames": 1,
        "pages": pages,
        "mode": mode,
        "bit_depth": bit_depth,
        "container_bit_depth": container,
        "bit_depth_source": source,
        "channels": channels,
        "color": _COLOR.get(channels, f"{channels} channels"),
        "exif_orientation": orientation or 1,
        "orientation_applied": bool(apply_exif and orientation not in (1, None)),
        "decode_scale": 1.0 / (1 << level),
        "intensity": f"native {array.dtype} as stored ({bit_depth} significant bits), higher = brighter",
        "pipeline": pipeline,
    }
    return LoadedImage(array, meta)


def _level(target: DecodeTarget | None, height: int, width: int, turned: bool | None) -> int:
    """The reduction level for a stored ``height`` x ``width`` image shown rotated by 90 degrees when ``turned``
    (None: the smaller level of either way)."""
    if target is None:
        return 0
    if turned is None:
        return min(target.reduction(height, width), target.swapped().reduction(height, width))
    return (target.swapped() if turned else target).reduction(height, width)


def _reduced_by(level: int, dct: int) -> str:
    if dct == level:
        return "JPEG DCT scaling"
    return f"JPEG DCT scaling 1/{1 << dct} then averaging" if dct else "averaging after decoding"


def _draft(im: Image.Image, level: int) -> int:
    """Ask libjpeg to decode at 1/2, 1/4 or 1/8 (DCT scaling) and return the level it will decode at."""
    if level <= 0 or im.mode not in ("L", "RGB", "YCbCr", "CMYK"):
        return 0
    w, h = im.size
    want = min(level, 3)
    im.draft(im.mode, (max(1, w >> want), max(1, h >> want)))  # Pillow floors the ratio: ask the floor size
    return next((k for k in range(4) if im.size == (reduced(w, k), reduced(h, k))), 0)


def _check_budget(path: Path, im: Image.Image, level: int, dct: int, budget: int) -> None:
    """Refuse before decoding: decoded pixels (at the DCT scale) x (Pillow's bytes + a converted copy) + the output
    at ``level`` counted as float32 (what the transforms turn it into next)."""
    w, h = im.size  # already at the DCT scale after a draft
    bands = len(im.getbands())
    pil = _PIL_BYTES.get(im.mode, 4)
    convert = 0 if im.mode in _NATIVE_MODES else 4
    out = reduced(w, level - dct) * reduced(h, level - dct) * bands * 4
    check_decode_budget(path, w * h * (pil + convert) + out, f"the {w}x{h} image", budget)


def _top(im: Image.Image) -> int | None:
    """The largest value of a 16-bit image, from the full-resolution pixels (None for other modes)."""
    if not im.mode.startswith("I;16"):
        return None
    lo_hi = im.getextrema()
    return int(lo_hi[1]) if isinstance(lo_hi, tuple) and not isinstance(lo_hi[0], tuple) else None


def _reduce(im: Image.Image, level: int) -> Image.Image | np.ndarray:
    """``im`` averaged over 2^level x 2^level blocks: by Pillow where it can, else in numpy."""
    if level <= 0:
        return im
    if im.mode in _PIL_REDUCES:
        return im.reduce(1 << level)
    return box_reduce(_native(np.asarray(im)), level)


#: Bit depths a 16-bit container commonly holds (CR / DX detectors write 10, 12 or 14 bits).
_CANDIDATE_BITS = (8, 10, 12, 14, 16)


def significant_bits(path: Path, fmt: str, array: np.ndarray, stored: int, top: int | None = None) -> tuple[int, str]:
    """The bits that carry data in a 16-bit image, and how that was decided.

    A PNG's sBIT chunk says it outright; otherwise the data's range decides (the smallest of 8 / 10 / 12 / 14 / 16
    bits that holds the largest value). Dividing 12-bit data by 65535 would darken every film 16-fold and silently
    flip decisions. Depths other than 16 are returned as stored. ``top``: the largest value when known from the
    full-resolution pixels (an averaged ``array`` may have lost the peak).
    """
    if stored != 16 or not np.issubdtype(array.dtype, np.integer):
        return stored, "container"
    if fmt == "png":
        sbit = _png_sbit(path)
        if sbit is not None and 1 <= sbit < 16:
            return sbit, f"sBIT chunk says {sbit}"
    if top is None:
        top = int(array.max()) if array.size else 0
    bits = next(b for b in _CANDIDATE_BITS if top < 2**b)
    if bits == 16:
        return 16, "container (the data uses the full 16-bit range)"
    return bits, f"data range: largest value {top} < 2^{bits}, no sBIT chunk"


def _png_sbit(path: Path) -> int | None:
    """The largest significant-bit count of a PNG's sBIT chunk (before the first IDAT), or None."""
    with open_source(path) as fh:
        fh.read(8)  # signature
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IDAT" or length > 1 << 24:
                return None
            data = fh.read(length)
            fh.read(4)  # CRC
            if kind == b"sBIT" and data:
                return max(data)


def _exif_orientation(im: Image.Image) -> int | None:
    value = im.getexif().get(_EXIF_ORIENTATION)
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _convert(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """``im`` in a mode whose samples numpy takes as they are, and the conversion done (if any)."""
    mode = im.mode
    if mode == "P":
        im, note = _depalette(im)
        return im, [note]
    if mode in _CONVERT_TO:
        im = im.convert(_CONVERT_TO[mode])
        return im, [f"mode: {mode} converted to {im.mode}"]
    if mode not in _NATIVE_MODES:
        raise ValueError(f"Pillow mode {mode!r} is not supported")
    return im, []


def _to_array(im: Image.Image | np.ndarray, stored_mode: str) -> tuple[np.ndarray, int]:
    """Pixels of ``im`` (converted, maybe reduced) as a native-dtype array, and the stored bit depth of
    ``stored_mode`` (the file's mode)."""
    bits = {"1": 1, "I": 32, "F": 32}
    bit_depth = 16 if stored_mode.startswith("I;16") else bits.get(stored_mode, 8)
    array = _native(np.asarray(im))
    if stored_mode == "I" and array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        # Pillow opens some 16-bit grayscale files as 32-bit "I"; keep them uint16
        array, bit_depth = array.astype(np.uint16), 16
    return np.ascontiguousarray(array), bit_depth


def _native(array: np.ndarray) -> np.ndarray:
    return array.astype(array.dtype.newbyteorder("=")) if array.dtype.byteorder == ">" else array


def _depalette(im: Image.Image) -> tuple[Image.Image, str]:
    """Expand a palette image to gray when its palette is gray, otherwise to RGB (RGBA with transparency)."""
    if "transparency" in im.info:
        return im.convert("RGBA"), "palette: expanded to RGBA (palette has transparency)"
    rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        return Image.fromarray(np.ascontiguousarray(arr[..., 0])), "palette: gray palette expanded to L"
    return rgb, "palette: expanded to RGB"
