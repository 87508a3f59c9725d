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
TIFF pages in the file; only the first is read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from loupe.core.errors import LoupeError
from loupe.core.io.common import MAX_PIXELS, LoadedImage, check_pixel_count, input_error
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
        "bit_depth_source", "channels", "color", "exif_orientation", "orientation_applied", "intensity", "pipeline",
    }
)  # fmt: skip


def read_image(path: str | Path, *, apply_exif: bool = True, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read the first frame of a PNG, JPEG or TIFF file, sniffed by content.

    ``apply_exif`` rotates / flips the pixels as the EXIF orientation tag says (what every photo viewer shows).
    Raises `UnsupportedInputError` naming the file, the problem and the fix for anything that is not a readable
    image of at most ``max_pixels`` values.
    """
    p = Path(path)
    fmt = sniff_format(p)
    if fmt.startswith("dicom"):
        raise input_error(p, "is a DICOM file, not a PNG/JPEG/TIFF image", "read it with read_dicom() or read_any()")
    if fmt not in IMAGE_FORMATS:
        raise input_error(
            p, "is not a PNG, JPEG, TIFF or DICOM file (unrecognised first bytes)", "convert it to PNG or TIFF"
        )
    try:
        return _decode(p, fmt, apply_exif=apply_exif, max_pixels=max_pixels)
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
        raise input_error(
            p, f"cannot be decoded as {fmt.upper()} ({type(exc).__name__}: {exc})", _fix_for(exc)
        ) from exc


def _fix_for(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError):
        return "the file is truncated; re-export or re-download it"
    return "the file is corrupt or uses an unsupported variant; re-export it as PNG"


def _decode(path: Path, fmt: str, *, apply_exif: bool, max_pixels: int) -> LoadedImage:
    with Image.open(path, formats=[_PIL_FORMAT[fmt]]) as im:
        width, height = im.size
        pages = int(getattr(im, "n_frames", 1) or 1)
        check_pixel_count(path, (height, width, len(im.getbands())), f"the {fmt.upper()} header", max_pixels)
        mode = im.mode
        im.load()
        orientation = _exif_orientation(im)
        pipeline: list[str] = []
        if pages > 1:
            pipeline.append(f"frames: read frame 1 of {pages}")
        out = im
        if apply_exif and orientation not in (1, None):
            out = ImageOps.exif_transpose(im) or im
            pipeline.append(f"exif: orientation {orientation} applied")
        array, bit_depth, steps = _to_array(out)
    pipeline += steps
    container = bit_depth
    bit_depth, source = significant_bits(path, fmt, array, bit_depth)
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
        "intensity": f"native {array.dtype} as stored ({bit_depth} significant bits), higher = brighter",
        "pipeline": pipeline,
    }
    return LoadedImage(array, meta)


#: Bit depths a 16-bit container commonly holds (CR / DX detectors write 10, 12 or 14 bits).
_CANDIDATE_BITS = (8, 10, 12, 14, 16)


def significant_bits(path: Path, fmt: str, array: np.ndarray, stored: int) -> tuple[int, str]:
    """The bits that carry data in a 16-bit image, and how that was decided.

    A PNG's sBIT chunk says it outright; otherwise the data's range decides (the smallest of 8 / 10 / 12 / 14 / 16
    bits that holds the largest value). Dividing 12-bit data by 65535 would darken every film 16-fold and silently
    flip decisions. Depths other than 16 are returned as stored.
    """
    if stored != 16 or not np.issubdtype(array.dtype, np.integer):
        return stored, "container"
    if fmt == "png":
        sbit = _png_sbit(path)
        if sbit is not None and 1 <= sbit < 16:
            return sbit, f"sBIT chunk says {sbit}"
    top = int(array.max()) if array.size else 0
    bits = next(b for b in _CANDIDATE_BITS if top < 2**b)
    if bits == 16:
        return 16, "container (the data uses the full 16-bit range)"
    return bits, f"data range: largest value {top} < 2^{bits}, no sBIT chunk"


def _png_sbit(path: Path) -> int | None:
    """The largest significant-bit count of a PNG's sBIT chunk (before the first IDAT), or None."""
    with open(path, "rb") as fh:
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


def _to_array(im: Image.Image) -> tuple[np.ndarray, int, list[str]]:
    """Pixels of ``im`` as a native-dtype array, its stored bit depth, and any mode conversion done."""
    steps: list[str] = []
    mode = im.mode
    bit_depth = 1 if mode == "1" else 16 if mode.startswith("I;16") else 32 if mode in ("I", "F") else 8
    if mode == "P":
        im, note = _depalette(im)
        steps.append(note)
    elif mode in _CONVERT_TO:
        im = im.convert(_CONVERT_TO[mode])
        steps.append(f"mode: {mode} converted to {im.mode}")
    elif mode not in _NATIVE_MODES:
        raise ValueError(f"Pillow mode {mode!r} is not supported")
    array = np.asarray(im)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    if mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535:
        # Pillow opens some 16-bit grayscale files as 32-bit "I"; keep them uint16
        array, bit_depth = array.astype(np.uint16), 16
        steps.append("mode: I (32-bit) holds 16-bit values, kept as uint16")
    return np.ascontiguousarray(array), bit_depth, steps


def _depalette(im: Image.Image) -> tuple[Image.Image, str]:
    """Expand a palette image to gray when its palette is gray, otherwise to RGB (RGBA with transparency)."""
    if "transparency" in im.info:
        return im.convert("RGBA"), "palette: expanded to RGBA (palette has transparency)"
    rgb = im.convert("RGB")
    arr = np.asarray(rgb)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        return Image.fromarray(np.ascontiguousarray(arr[..., 0])), "palette: gray palette expanded to L"
    return rgb, "palette: expanded to RGB"
