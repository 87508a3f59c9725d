"""Read a DICOM file the way a radiology viewer displays it, with every pixel decision written down.

``read_dicom`` returns ``float32`` in [0, 1], higher = brighter whatever the photometric interpretation:
grayscale ``[H, W]`` (or ``[F, H, W]`` for multi-frame), colour ``[H, W, 3]`` (``[F, H, W, 3]``).

Metadata keys (besides the common ``path``, ``source_format`` = ``"dicom"``, ``original_size``, ``frames``,
``intensity``, ``pipeline``):

- pixel module: ``photometric_interpretation``, ``rows``, ``columns``, ``samples_per_pixel``, ``bits_allocated``,
  ``bits_stored`` (also as ``bit_depth``), ``pixel_representation``, ``transfer_syntax`` (UID),
  ``transfer_syntax_name``, ``compressed``;
- decoding: ``decode_scale`` (1 = every stored pixel; 1/2^k when a `DecodeTarget` let the file be decoded at a
  reduced resolution; ``pixel_spacing`` stays that of the stored pixels);
- display decisions: ``rescale`` (source, slope, intercept, type such as ``"HU"``), ``voi`` (kind ``"lut"`` /
  ``"window"`` / ``"minmax"``, with centre / width / function / index / count or low / high), ``inverted``
  (MONOCHROME1 flipped so that higher = brighter);
- study: ``modality``, ``view_position``, ``presentation_intent`` ("FOR PRESENTATION" / "FOR PROCESSING"),
  ``body_part``, ``pixel_spacing`` (row, column mm) with ``pixel_spacing_source`` (the tag it came from),
  ``patient_sex``, ``patient_age`` (for subgroup tables), ``study_instance_uid``, ``series_instance_uid``.

Nothing else identifying (no names, IDs, birth dates, accession numbers, institutions) is ever copied.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from loupe.core.errors import LoupeError
from loupe.core.io import dicom_lut
from loupe.core.io.common import (
    DECODE_BUDGET,
    MAX_PIXELS,
    DecodeTarget,
    LoadedImage,
    check_pixel_count,
    file_size,
    input_error,
    is_decoder_failure,
    open_source,
)
from loupe.core.io.dicom_pixels import decode_pixels
from loupe.core.io.sniff import sniff_format

log = logging.getLogger(__name__)

_INSTALL_CODECS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
_REEXPORT = "the file is truncated or corrupt; re-export it from the PACS or modality"
_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # SOF0-15 (not DHT/JPG/DAC) and JPEG-LS SOF55
_META_TAGS = {
    "modality": "Modality",
    "view_position": "ViewPosition",
    "presentation_intent": "PresentationIntentType",
    "body_part": "BodyPartExamined",
    "patient_sex": "PatientSex",
    "patient_age": "PatientAge",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
}


#: The metadata keys of `read_dicom` that may be stored (tables, MLflow, review cases): an allowlist, so a key added
#: later is kept out until someone decides it is not identifying. UIDs and the path are never on it.
SAFE_META_KEYS = frozenset(
    {
        "source_format", "original_size", "frames", "intensity", "pipeline", "photometric_interpretation", "rows",
        "columns", "samples_per_pixel", "bits_allocated", "bits_stored", "bit_depth", "pixel_representation",
        "transfer_syntax", "transfer_syntax_name", "compressed", "modality", "view_position", "presentation_intent",
        "body_part", "patient_sex", "patient_age", "patient_age_years", "pixel_spacing", "pixel_spacing_source",
        "rescale", "voi", "inverted", "decode_scale",
    }
)  # fmt: skip


def read_dicom(
    path: str | Path,
    *,
    voi_index: int | None = 0,
    max_pixels: int = MAX_PIXELS,
    target: DecodeTarget | None = None,
    decode_budget: int = DECODE_BUDGET,
) -> LoadedImage:
    """Read and render one DICOM file: modality LUT → VOI (LUT or window) → MONOCHROME1 inversion → [0, 1].

    ``voi_index`` picks the VOI LUT / window when the file holds several (0 = the first, what viewers show);
    ``None`` ignores the file's VOI and maps the modality values' min..max linearly to [0, 1].
    ``target``: the model input the pixels are for; an image larger than it on both sides is decoded at 1/2^k of
    its resolution (JPEG 2000 resolution levels, JPEG DCT scaling, else averaging; see
    `loupe.core.io.dicom_pixels`), recorded as ``meta["decode_scale"]``. ``decode_budget``: the most bytes the
    decode and rendering may take.
    Every failure (not DICOM, truncated, no pixel data, missing codec, unsupported photometric interpretation,
    more than ``max_pixels`` values, over the budget) raises `UnsupportedInputError` naming the file, the tag and
    the fix.
    """
    p = Path(path)
    fmt = sniff_format(p)
    if not fmt.startswith("dicom"):
        raise input_error(
            p, f"is not a DICOM file (no 'DICM' marker at byte 128; looks like {fmt})", "read it with read_any()"
        )
    try:
        ds = _parse(p, force=fmt == "dicom-no-preamble")
        return _render(p, ds, voi_index, max_pixels, target, decode_budget)
    except LoupeError:
        raise
    except MemoryError as exc:
        raise input_error(p, "ran out of memory while decoding the pixel data", _REEXPORT) from exc
    except BaseException as exc:  # noqa: BLE001 - boundary: pydicom / numpy / codecs raise many types on bad data
        if not is_decoder_failure(exc):
            raise
        raise input_error(p, f"cannot be rendered ({type(exc).__name__}: {exc})", _REEXPORT) from exc


def _parse(path: Path, *, force: bool) -> Dataset:
    try:
        with open_source(path) as fh:  # the bytes `read_once` holds, when it does
            return pydicom.dcmread(fh, force=force)
    except Exception as exc:  # noqa: BLE001 - boundary, see read_dicom
        size = file_size(path)
        raise input_error(
            path, f"cannot be parsed as DICOM at {size} bytes ({type(exc).__name__}: {exc})", _REEXPORT
        ) from exc


def _render(
    path: Path, ds: Dataset, voi_index: int | None, max_pixels: int, target: DecodeTarget | None, budget: int
) -> LoadedImage:
    pi = _check_pixel_module(path, ds)
    frames = _int(ds.get("NumberOfFrames"), 1)
    rows, cols, spp = int(ds.Rows), int(ds.Columns), _int(ds.get("SamplesPerPixel"), 1)
    check_pixel_count(
        path, (frames, rows, cols, spp), "(0028,0010/0011/0008/0002) Rows x Columns x frames x samples", max_pixels
    )
    inferred = "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    tsyntax = _check_decoder(path, ds)
    _check_native_length(path, ds, tsyntax)
    _check_codestream(path, ds, tsyntax, frames)
    try:
        decoded = decode_pixels(path, ds, tsyntax, frames, target, budget, voi_index)
    except LoupeError:
        raise
    except BaseException as exc:  # noqa: BLE001 - boundary, see read_dicom
        if not is_decoder_failure(exc):
            raise
        problem = f"(7FE0,0010) Pixel Data in {tsyntax.name} cannot be decoded ({type(exc).__name__}: {exc})"
        raise input_error(path, problem, _REEXPORT) from exc
    arr = decoded.array
    pipeline = [f"decode: {tsyntax.name}" + (" (compressed)" if tsyntax.is_encapsulated else "")]
    if inferred:
        pipeline[0] += " (inferred: the file has no File Meta header)"
    pipeline += decoded.steps
    meta = _base_meta(path, ds, tsyntax, frames)
    meta["decode_scale"] = 1.0 / (1 << decoded.level)
    if pi in dicom_lut.MONOCHROME:
        out = _render_gray(arr, ds, voi_index, tsyntax, pipeline, meta)
    else:
        out = _render_color(arr, ds, pi, pipeline, meta)
    meta["pipeline"] = pipeline
    return LoadedImage(np.ascontiguousarray(out, dtype=np.float32), meta)


def _render_gray(
    arr: np.ndarray, ds: Dataset, voi_index: int | None, tsyntax: Any, pipeline: list[str], meta: dict[str, Any]
) -> np.ndarray:
    values, step, meta["rescale"] = dicom_lut.modality(arr, ds)
    pipeline.append(step)
    try:
        out, step, meta["voi"] = dicom_lut.voi(values, ds, voi_index)
    except IndexError as exc:
        raise input_error(meta["path"], f"(0028,1050)/(0028,3010) VOI: {exc}", "pass voi_index=0 or None") from exc
    pipeline.append(step)
    meta["inverted"] = ds.PhotometricInterpretation == "MONOCHROME1"
    if meta["inverted"]:
        out = 1.0 - out
        pipeline.append("monochrome1: inverted (1 - x) so that higher = brighter")
    meta["intensity"] = f"voi-rendered 0..1 ({meta['voi']['kind']}), higher = brighter (as MONOCHROME2)"
    return out


def _render_color(arr: np.ndarray, ds: Dataset, pi: str, pipeline: list[str], meta: dict[str, Any]) -> np.ndarray:
    if pi == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        arr = apply_color_lut(arr, ds)
        pipeline.append(f"palette: indices expanded through the {bits}-bit RGB palette")
    else:
        bits = int(ds.BitsStored)
        if pi != "RGB":
            pipeline.append(f"color: {pi} converted to RGB by the decoder")
    out = arr.astype(np.float32)  # exact for samples up to 2^24, and IEEE division rounds as float64-then-cast
    out /= np.float32(2**bits - 1)  # in place: a cine of 120 colour frames is one float32 copy, not three
    pipeline.append(f"scale: divided by {2**bits - 1} ({bits}-bit) to 0..1")
    meta["inverted"] = False
    meta["intensity"] = f"RGB 0..1 (samples / {2**bits - 1}), channels last"
    return out


def _check_pixel_module(path: Path, ds: Dataset) -> str:
    """The photometric interpretation, once pixel data and the tags needed to read it are known present."""
    if "PixelData" not in ds:
        other = next((t for t in ("FloatPixelData", "DoubleFloatPixelData") if t in ds), None)
        if other:
            raise input_error(
                path, f"holds {other}, not integer (7FE0,0010) Pixel Data", "convert it to integer pixels"
            )
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise input_error(
            path,
            f"has no (7FE0,0010) Pixel Data ({kind}): it is not an image, or it is truncated before its pixels",
            "pass an image object (CR, DX, CT, MR...) or re-export the complete file",
        )
    for tag, name in (("(0028,0010)", "Rows"), ("(0028,0011)", "Columns"), ("(0028,0100)", "BitsAllocated")):
        if ds.get(name) in (None, ""):
            raise input_error(path, f"{tag} {name} is missing, so the pixel data cannot be laid out", _REEXPORT)
    for tag, name in _GEOMETRY_TAGS:  # a corrupt value must not be read as a default (pydicom would keep the text)
        value = ds.get(name)
        if value not in (None, "") and not _is_whole(value):
            problem = f"{tag} {name} is {str(value)!r}, not a whole number, so the pixel data cannot be laid out"
            raise input_error(path, problem, _REEXPORT)
    pi = str(ds.get("PhotometricInterpretation") or "").strip()
    if pi not in dicom_lut.MONOCHROME + dicom_lut.COLOR:
        shown = repr(pi) if pi else "missing"
        raise input_error(
            path,
            f"(0028,0004) Photometric Interpretation {shown} is not supported "
            f"(supported: {', '.join(dicom_lut.MONOCHROME + dicom_lut.COLOR)})",
            "convert it to MONOCHROME2 or RGB and re-export",
        )
    if "BitsStored" not in ds:
        ds.BitsStored = ds.BitsAllocated  # PS3.3 allows neither, but old files omit it; all bits are pixel bits
    return pi


def _check_decoder(path: Path, ds: Dataset) -> Any:
    """The transfer syntax, once pydicom has a working decoder for it."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or _infer_tsyntax(ds)
    if tsyntax is None:
        raise input_error(
            path, "(0002,0010) Transfer Syntax UID is missing", "re-export the file with a File Meta header"
        )
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise input_error(
            path,
            f"(0002,0010) transfer syntax {tsyntax.name} ({tsyntax}) has no pixel decoder",
            "convert it to Explicit VR Little Endian (e.g. `dcmconv +te` or `gdcmconv --raw`)",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise input_error(
            path,
            f"(0002,0010) transfer syntax {tsyntax.name} needs a codec that is missing ({missing})",
            _INSTALL_CODECS,
        )
    return tsyntax


def _infer_tsyntax(ds: Dataset) -> UID | None:
    """Files without a File Meta header: the syntax pydicom detected while parsing (always a native one)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None or (implicit and not little):
        return None
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _check_native_length(path: Path, ds: Dataset, tsyntax: UID) -> None:
    if tsyntax.is_encapsulated:
        return
    expected = get_expected_length(ds, unit="bytes")  # knows YBR_FULL_422 subsampling and 1-bit packing
    actual = len(ds.PixelData or b"")
    if actual < expected:
        raise input_error(
            path,
            f"the file is truncated: (7FE0,0010) Pixel Data has {actual:,} of {expected:,} bytes "
            f"(file ends at byte {file_size(path):,})",
            "re-export or re-transfer the complete file",
        )


def _check_codestream(path: Path, ds: Dataset, tsyntax: UID, frames: int) -> None:
    """Before decoding, compare the first compressed frame with the header, so a corrupt Rows/Columns cannot make
    the decoder allocate a huge buffer: JPEG / JPEG-LS / JPEG 2000 state their own size; RLE expands at most 64x.
    """
    if not tsyntax.is_encapsulated:
        return
    frame = next(generate_frames(ds.PixelData, number_of_frames=frames), b"")
    if not frame:
        raise input_error(path, "(7FE0,0010) encapsulated Pixel Data holds no frame", _REEXPORT)
    rows, cols = int(ds.Rows), int(ds.Columns)
    size = _j2k_size(frame) or _jpeg_size(frame)
    if size is not None and size != (rows, cols):
        raise input_error(
            path,
            f"(0028,0010/0011) Rows x Columns {rows}x{cols} differ from the compressed frame's {size[0]}x{size[1]}",
            "the header is corrupt; re-export the file",
        )
    decoded = rows * cols * _int(ds.get("SamplesPerPixel"), 1) * -(-int(ds.BitsAllocated) // 8)
    if tsyntax == RLELossless and decoded > 64 * len(frame):
        raise input_error(
            path,
            f"(0028,0010/0011) Rows x Columns {rows}x{cols} need {decoded:,} bytes, more than the "
            f"{len(frame):,}-byte RLE frame can expand to",
            "the header is corrupt; re-export the file",
        )


def _j2k_size(src: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a raw JPEG 2000 codestream's SIZ segment (ISO/IEC 15444-1 A.5.1)."""
    if len(src) < 24 or src[:4] != b"\xff\x4f\xff\x51":
        return None
    xsiz, ysiz, xosiz, yosiz = (int.from_bytes(src[i : i + 4], "big") for i in (8, 12, 16, 20))
    return ysiz - yosiz, xsiz - xosiz


def _jpeg_size(src: bytes) -> tuple[int, int] | None:
    """(rows, columns) from a JPEG / JPEG-LS SOF segment (ISO/IEC 10918-1 B.2.2), None when not found or 0."""
    if src[:2] != b"\xff\xd8":
        return None
    offset = 2
    while offset + 9 <= len(src) and src[offset] == 0xFF:
        marker = src[offset + 1]
        if marker in _JPEG_SOF:
            rows, cols = (
                int.from_bytes(src[offset + 5 : offset + 7], "big"),
                int.from_bytes(src[offset + 7 : offset + 9], "big"),
            )
            return (rows, cols) if rows and cols else None
        offset += 2 + int.from_bytes(src[offset + 2 : offset + 4], "big")
    return None


def _base_meta(path: Path, ds: Dataset, tsyntax: Any, frames: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"path": str(path), "source_format": "dicom"}
    meta["photometric_interpretation"] = str(ds.PhotometricInterpretation)
    meta["rows"], meta["columns"] = int(ds.Rows), int(ds.Columns)
    meta["original_size"] = (meta["rows"], meta["columns"])
    meta["frames"] = frames
    meta["samples_per_pixel"] = _int(ds.get("SamplesPerPixel"), 1)
    meta["bits_allocated"] = int(ds.BitsAllocated)
    meta["bits_stored"] = meta["bit_depth"] = int(ds.BitsStored)
    meta["pixel_representation"] = _int(ds.get("PixelRepresentation"), 0)
    meta["transfer_syntax"], meta["transfer_syntax_name"] = str(tsyntax), tsyntax.name
    meta["compressed"] = bool(tsyntax.is_encapsulated)
    for key, keyword in _META_TAGS.items():
        meta[key] = _text(ds, keyword)
    meta["patient_age"], meta["patient_age_years"] = normalise_age(meta.get("patient_age"))
    meta["pixel_spacing"], meta["pixel_spacing_source"] = _pixel_spacing(ds)
    return meta


_AGE = re.compile(r"\s*(\d{1,3})\s*([YMWD])\s*", re.IGNORECASE)
_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def age_years(value: str | None) -> float | None:
    """DICOM AS (``"045Y"``, ``"006M"``, ``"003W"``, ``"010D"``) in years, capped at 90; None when absent/bad."""
    m = _AGE.fullmatch(value or "")
    return None if m is None else min(int(m[1]) / _PER_YEAR[m[2].upper()], 90.0)


def normalise_age(value: str | None) -> tuple[str | None, float | None]:
    """(PatientAge as stored by Loupe, years): the canonical ``nnnU`` form, ``"090Y+"`` for 90 and over (HIPAA safe
    harbour: such ages identify), and None for anything that is not a DICOM age string. The file's own text is
    never kept: free text (``"94 years, John"``) could carry anything."""
    m = _AGE.fullmatch(value or "")
    if m is None:
        return None, None
    years = age_years(value)
    assert years is not None
    if years >= 90:
        return "090Y+", 90.0
    return f"{int(m[1]):03d}{m[2].upper()}", years


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm: PixelSpacing (calibrated at the patient) before ImagerPixelSpacing."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is not None and len(value) == 2:
                return (float(value[0]), float(value[1])), keyword
        except (TypeError, ValueError):
            log.debug("ignoring malformed %s", keyword)
    return None, None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except (TypeError, ValueError):
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


_GEOMETRY_TAGS = (
    ("(0028,0010)", "Rows"),
    ("(0028,0011)", "Columns"),
    ("(0028,0100)", "BitsAllocated"),
    ("(0028,0101)", "BitsStored"),
    ("(0028,0002)", "SamplesPerPixel"),
    ("(0028,0008)", "NumberOfFrames"),
    ("(0028,0103)", "PixelRepresentation"),
)


def _is_whole(value: Any) -> bool:
    try:
        return float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
