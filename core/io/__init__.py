"""Readers for what clinicians and investigators actually send: DICOM, PNG, JPEG and TIFF, sniffed by content.

Every reader returns a `LoadedImage` (array + metadata with each pixel decision in ``meta["pipeline"]``) or
raises `UnsupportedInputError` naming the file, the problem and the fix. numpy only: no torch here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from loupe.core.io.common import (
    DECODE_BUDGET,
    MAX_PIXELS,
    DecodeTarget,
    LoadedImage,
    check_decode_budget,
    check_pixel_count,
    input_error,
)
from loupe.core.io.dicom import SAFE_META_KEYS as dicom_safe_keys
from loupe.core.io.dicom import read_dicom
from loupe.core.io.images import SAFE_META_KEYS as image_safe_keys
from loupe.core.io.images import read_image
from loupe.core.io.sniff import IMAGE_FORMATS, IMAGE_SUFFIXES, sniff_bytes, sniff_format

_SAFE_KEYS = {"dicom": dicom_safe_keys, **{fmt: image_safe_keys for fmt in IMAGE_FORMATS}}
_COMMON_KEYS = frozenset({"source_format", "original_size", "frames", "intensity", "pipeline", "decode_scale"})


def safe_meta(meta: dict[str, Any], extra: Iterable[str] = ()) -> dict[str, Any]:
    """The part of a reader's ``meta`` that may be stored anywhere: the allowlist of the reader that produced it
    (by ``source_format``) plus ``extra`` keys a domain declares for what it adds (tissue fraction, face score...).
    Everything else (paths, UIDs, any key nobody has vetted) is left out."""
    allowed = _SAFE_KEYS.get(str(meta.get("source_format")), _COMMON_KEYS) | frozenset(extra)
    return {k: v for k, v in meta.items() if k in allowed}


def read_any(path: str | Path, **dicom_options: Any) -> LoadedImage:
    """Read ``path`` with `read_dicom` or `read_image`, chosen by the file's content (not its extension).

    ``dicom_options`` (``voi_index``, ``max_pixels``, ``target``, ``decode_budget``) go to `read_dicom`; all but
    ``voi_index`` also to `read_image`.
    """
    fmt = sniff_format(path)
    if fmt.startswith("dicom"):
        return read_dicom(path, **dicom_options)
    if fmt in IMAGE_FORMATS:
        return read_image(path, **{k: v for k, v in dicom_options.items() if k != "voi_index"})
    raise input_error(path, "is not a PNG, JPEG, TIFF or DICOM file (unrecognised first bytes)", "convert it to PNG")


__all__ = [
    "DECODE_BUDGET",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "DecodeTarget",
    "LoadedImage",
    "check_decode_budget",
    "check_pixel_count",
    "read_any",
    "read_dicom",
    "read_image",
    "safe_meta",
    "sniff_bytes",
    "sniff_format",
]
