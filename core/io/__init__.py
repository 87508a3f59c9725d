"""Readers for what clinicians and investigators actually send: DICOM, PNG, JPEG and TIFF, sniffed by content.

Every reader returns a `LoadedImage` (array + metadata with each pixel decision in ``meta["pipeline"]``) or
raises `UnsupportedInputError` naming the file, the problem and the fix. numpy only: no torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loupe.core.io.common import MAX_PIXELS, LoadedImage, check_pixel_count, input_error
from loupe.core.io.dicom import read_dicom
from loupe.core.io.images import read_image
from loupe.core.io.sniff import IMAGE_FORMATS, sniff_bytes, sniff_format


def read_any(path: str | Path, **dicom_options: Any) -> LoadedImage:
    """Read ``path`` with `read_dicom` or `read_image`, chosen by the file's content (not its extension).

    ``dicom_options`` (``voi_index``, ``max_pixels``) go to `read_dicom`; ``max_pixels`` also to `read_image`.
    """
    fmt = sniff_format(path)
    if fmt.startswith("dicom"):
        return read_dicom(path, **dicom_options)
    if fmt in IMAGE_FORMATS:
        return read_image(path, **{k: v for k, v in dicom_options.items() if k == "max_pixels"})
    raise input_error(path, "is not a PNG, JPEG, TIFF or DICOM file (unrecognised first bytes)", "convert it to PNG")


__all__ = [
    "IMAGE_FORMATS",
    "MAX_PIXELS",
    "LoadedImage",
    "check_pixel_count",
    "read_any",
    "read_dicom",
    "read_image",
    "sniff_bytes",
    "sniff_format",
]
