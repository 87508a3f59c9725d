"""Whole-slide images behind one interface: pyramid levels, microns per pixel, regions, thumbnails.

`open_slide(path, mpp=None)` picks the backend by content:

- **OpenSlide** (``openslide-python`` + ``openslide-bin``): Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN,
  Ventana, pyramidal TIFF, …;
- **DICOM-WSI** (VL Whole Slide Microscopy, one file per level, ``TILED_FULL`` frames) read frame by frame with
  pydicom: only the frames a region touches are decoded;
- **plain images** (PNG / JPEG / TIFF that are no pyramid) through `read_image`, its size limits included.

Coordinates are level-0 pixels ``(x, y)``; sizes ``(width, height)``; pixels come back RGB ``uint8 [H, W, 3]``.
Microns per pixel (``mpp``) come from the file (OpenSlide's ``openslide.mpp-x``, TIFF resolution, DICOM Pixel
Spacing or Imaged Volume Width); an explicit ``mpp`` overrides them; `Slide.require_mpp` is the clear error for a
slide that states none when none was given. Any failure to open or read is an `UnsupportedInputError` naming the
file, the problem and the fix, so a bad slide becomes a failed row.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from loupe.core.errors import UnsupportedInputError
from loupe.core.io.common import input_error
from loupe.core.io.sniff import IMAGE_FORMATS, sniff_format

log = logging.getLogger(__name__)


def _not_jfif_notice(record: logging.LogRecord) -> bool:
    return "JFIF APP marker" not in record.getMessage()


_JFIF_NOTICE = _not_jfif_notice

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Extensions that claim a slide (a broken one still becomes a failed row, not a skipped file).
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff",
                            ".dcm"})  # fmt: skip
#: The slide metadata that may be stored (an allowlist: no barcode, label, macro or free-text properties).
SAFE_META_KEYS = frozenset({"source_format", "backend", "vendor", "levels", "level_dimensions", "level_downsamples",
                            "original_size", "mpp", "mpp_source", "objective_power", "frames", "pipeline",
                            "intensity"})  # fmt: skip


class Slide:
    """A whole-slide image. Subclasses fill the attributes and implement `_read`."""

    path: Path
    backend: str
    vendor: str | None = None
    level_dimensions: tuple[tuple[int, int], ...] = ()
    level_downsamples: tuple[float, ...] = ()
    mpp: tuple[float, float] | None = None
    mpp_source: str | None = None
    objective_power: float | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def override_mpp(self, mpp: float | None) -> None:
        if mpp is not None:
            if not (math.isfinite(mpp) and 0.01 <= mpp <= 100):
                raise input_error(self.path, f"microns per pixel {mpp} is not plausible", "pass a value like 0.25-1")
            self.mpp, self.mpp_source = (float(mpp), float(mpp)), "override"

    def require_mpp(self) -> float:
        """Level-0 microns per pixel (mean of x and y), or the error that says how to give it."""
        if self.mpp is None:
            raise input_error(
                self.path,
                "the slide states no microns per pixel, so tiles at a physical size cannot be cut",
                "give the scanner's resolution in microns per pixel (0.25 at 40x, 0.5 at 20x)",
            )
        return (self.mpp[0] + self.mpp[1]) / 2

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (read there, then resize down)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.0001]
        return max(ok) if ok else 0

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB ``uint8 [h, w, 3]`` of ``size`` (w, h) at ``level``, its top-left at level-0 ``location``; outside the
        slide is white."""
        if not 0 <= level < len(self.level_dimensions):
            raise input_error(self.path, f"level {level} does not exist (the slide has {len(self.level_dimensions)})",
                              "pick a level from 0")  # fmt: skip
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0 or w * h > 2**26:
            raise input_error(self.path, f"region size {size} is empty or too large", "read smaller regions")
        try:
            return self._read((int(location[0]), int(location[1])), level, (w, h))
        except UnsupportedInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - boundary: the backends raise many types on damaged data
            problem = f"cannot read the region {location} {size} at level {level} ({type(exc).__name__}: {exc})"
            raise input_error(self.path, problem, "the slide is damaged; re-export it") from exc

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide, RGB ``uint8``, its longer side at most ``max_side`` (read from the coarsest level that
        still has enough pixels)."""
        w0, h0 = self.dimensions
        scale = min(1.0, max_side / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.best_level(1 / scale)
        lw, lh = self.level_dimensions[level]
        region = self.read_region((0, 0), level, (lw, lh))
        from PIL import Image

        return np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))

    def meta(self) -> dict[str, Any]:
        w, h = self.dimensions
        return {
            "source_format": "slide",
            "backend": self.backend,
            "vendor": self.vendor,
            "levels": len(self.level_dimensions),
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": [round(d, 4) for d in self.level_downsamples],
            "original_size": (h, w),
            "frames": 1,
            "mpp": list(self.mpp) if self.mpp else None,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "intensity": "RGB 8-bit (brightfield)",
            "pipeline": [f"slide: {self.backend}, {len(self.level_dimensions)} level(s)"],
        }

    def close(self) -> None:
        return None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------ OpenSlide
class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise input_error(path, f"OpenSlide cannot open it ({exc})", "the slide is truncated or damaged; "
                              "re-export or re-transfer it") from None  # fmt: skip
        p = self._osr.properties
        self.vendor = p.get("openslide.vendor")
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        mx, my = _float(p.get("openslide.mpp-x")), _float(p.get("openslide.mpp-y"))
        if mx and my:
            self.mpp, self.mpp_source = (mx, my), "openslide.mpp"
        self.objective_power = _float(p.get("openslide.objective-power"))

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self._osr.read_region(location, level, size))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0  # outside the scanned area: transparent → white
        return (rgba[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)

    def close(self) -> None:
        self._osr.close()


# ------------------------------------------------------------------------------------------------------ DICOM-WSI
class DicomWsiSlide(Slide):
    """One DICOM VL Whole Slide Microscopy file (one level), ``TILED_FULL``: frames row by row over the total pixel
    matrix; each frame is decoded only when a region touches it (a small LRU keeps the last few)."""

    backend = "dicom-wsi"

    def __init__(self, path: Path):
        import pydicom

        self.path = path
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - boundary
            raise input_error(path, f"cannot be parsed as DICOM ({type(exc).__name__}: {exc})",
                              "re-export the slide") from None  # fmt: skip
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            raise input_error(path, "is a DICOM file but not a whole-slide image (VL Whole Slide Microscopy)",
                              "score it with a radiology domain, or pass the slide's own DICOM files")  # fmt: skip
        organisation = str(ds.get("DimensionOrganizationType") or "TILED_FULL")
        if organisation != "TILED_FULL":
            raise input_error(path, f"frames are organised {organisation}, not TILED_FULL",
                              "convert it with wsidicomizer or re-export as TILED_FULL")  # fmt: skip
        self._ds = ds
        self.vendor = str(ds.get("Manufacturer") or "") or None
        self._tile = (int(ds.Columns), int(ds.Rows))
        w, h = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        self._grid = (math.ceil(w / self._tile[0]), math.ceil(h / self._tile[1]))
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames < self._grid[0] * self._grid[1]:
            raise input_error(path, f"holds {frames} frames, fewer than the {self._grid[0]}x{self._grid[1]} tiles "
                              f"of its {w}x{h} matrix", "the file is truncated; re-export it")  # fmt: skip
        self.level_dimensions, self.level_downsamples = ((w, h),), (1.0,)
        self.mpp, self.mpp_source = _dicom_mpp(ds, w, h)
        self.objective_power = _float(ds.get("ObjectiveLensPower"))
        self._frame = functools.lru_cache(maxsize=16)(self._decode)
        self.column_major = self._columns_first()
        if self.column_major:
            log.warning("%s: frames are stored column by column, not row by row as TILED_FULL says; read so", path)

    def meta(self) -> dict[str, Any]:
        out = super().meta()
        if self.column_major:
            out["pipeline"].append("frames: stored column by column (against TILED_FULL), read so")
        return out

    def _columns_first(self) -> bool:
        """Whether the frames run down the columns first (some converters write them so, against PS3.3
        C.8.12.4.1.9). The padding of the partial edge frames tells: frame ``rows - 1`` ends the first column when the
        order is column-major (its rows beyond the matrix are one flat value), and frame ``cols - 1`` ends the first
        row when it is row-major (its columns beyond the matrix are flat)."""
        (tw, th), (W, H) = self._tile, self.dimensions
        cols, rows = self._grid
        if cols < 2 or rows < 2 or not H % th:
            return False
        margin = 8  # a JPEG block: compression rings across the edge of the matrix
        bottom_of_first_column = _flat(self._frame(rows - 1)[H % th + margin :])
        if W % tw:
            return bottom_of_first_column and not _flat(self._frame(cols - 1)[:, W % tw + margin :])
        return bottom_of_first_column

    def _decode(self, index: int) -> np.ndarray:
        import warnings

        from pydicom.pixels import pixel_array

        # scanners write JFIF RGB frames as 'RGB'; pydicom says so (warning and log record) for every frame
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*JFIF APP marker.*", category=UserWarning)
            pydicom_log = logging.getLogger("pydicom")
            pydicom_log.addFilter(_JFIF_NOTICE)
            try:
                a = pixel_array(self._ds, index=index)
            finally:
                pydicom_log.removeFilter(_JFIF_NOTICE)
        return a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        tw, th = self._tile
        out = np.full((h, w, 3), 255, np.uint8)
        W, H = self.dimensions
        for ty in range(max(0, y // th), min(self._grid[1], (y + h - 1) // th + 1)):
            for tx in range(max(0, x // tw), min(self._grid[0], (x + w - 1) // tw + 1)):
                index = tx * self._grid[1] + ty if self.column_major else ty * self._grid[0] + tx
                frame = self._frame(index)
                fx0, fy0 = tx * tw, ty * th
                x0, y0 = max(x, fx0), max(y, fy0)
                x1, y1 = min(x + w, fx0 + tw, W), min(y + h, fy0 + th, H)
                if x1 > x0 and y1 > y0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = frame[y0 - fy0 : y1 - fy0, x0 - fx0 : x1 - fx0, :3]
        return out


def _flat(a: np.ndarray) -> bool:
    """A padding strip: (almost) one value, JPEG noise aside."""
    return a.size > 0 and float(a.astype(np.float32).std()) < 2.0


def _dicom_mpp(ds: Any, w: int, h: int) -> tuple[tuple[float, float] | None, str | None]:
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        measures = seq[0].get("PixelMeasuresSequence") if seq else None
        if measures and "PixelSpacing" in measures[0]:
            row, col = (float(v) * 1000 for v in measures[0].PixelSpacing)  # mm → µm
            return (col, row), "PixelSpacing"
    iw, ih = _float(ds.get("ImagedVolumeWidth")), _float(ds.get("ImagedVolumeHeight"))
    if iw and ih:
        return (iw * 1000 / w, ih * 1000 / h), "ImagedVolumeWidth/Height"
    return None, None


# --------------------------------------------------------------------------------------------------- plain images
class ImageSlide(Slide):
    """A PNG / JPEG / single-level TIFF treated as a one-level slide (its size limited as every image is)."""

    backend = "image"

    def __init__(self, path: Path):
        from loupe.core.io.images import read_image

        img = read_image(path)
        a = img.array
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.dtype != np.uint8:
            a = (a.astype(np.float32) / float(2 ** int(img.meta.get("bit_depth") or 16) - 1) * 255).astype(np.uint8)
        self.path, self._a = path, np.ascontiguousarray(a[..., :3])
        self.level_dimensions, self.level_downsamples = ((a.shape[1], a.shape[0]),), (1.0,)
        self.mpp = _tiff_mpp(path) if img.meta.get("source_format") == "tiff" else None
        self.mpp_source = "TIFF resolution" if self.mpp else None

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        (x, y), (w, h) = location, size
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self._a.shape[:2]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._a[y0:y1, x0:x1]
        return out


def _tiff_mpp(path: Path) -> tuple[float, float] | None:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xr, yr = tags.get("XResolution"), tags.get("YResolution")
            if not (unit and xr and yr) or int(unit.value) not in (2, 3):
                return None
            per_um = {2: 25400.0, 3: 10000.0}[int(unit.value)]  # inch, centimetre
            x, y = (v.value[1] / v.value[0] * per_um for v in (xr, yr))
            return (x, y) if 0.01 < x < 100 and 0.01 < y < 100 else None
    except Exception:  # noqa: BLE001 - an unreadable resolution tag is simply no resolution
        return None


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open ``path`` with the backend its content calls for (see the module docstring); ``mpp`` overrides the
    slide's own microns per pixel."""
    p = Path(path)
    fmt = sniff_format(p)  # missing / empty / unreadable files raise here, by name
    if fmt.startswith("dicom"):
        slide: Slide = DicomWsiSlide(p)
    else:
        import openslide

        vendor = None
        try:
            vendor = openslide.OpenSlide.detect_format(str(p))
        except openslide.OpenSlideError:
            vendor = None
        if vendor is not None:
            slide = OpenSlideSlide(p)
        elif fmt in IMAGE_FORMATS:
            slide = ImageSlide(p)
        else:
            raise input_error(p, "is not a slide OpenSlide can read, a DICOM whole-slide image or an image",
                              "the file is damaged or of an unsupported format; re-export it as SVS or "
                              "pyramidal TIFF")  # fmt: skip
    slide.override_mpp(mpp)
    return slide
