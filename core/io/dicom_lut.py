"""The grayscale display pipeline of a DICOM image, one visible step at a time (PS3.3 C.11, PS3.4 N.2).

stored values → BitsStored mask → modality LUT / rescale → VOI LUT or window → MONOCHROME1 inversion → [0, 1]

Each step returns the new array and a one-line description that `read_dicom` appends to ``meta["pipeline"]``.
The modality LUT and VOI LUT tables are applied by pydicom's own functions (they handle the LUT encodings); the
window is computed here with the standard's formulas so that its output is directly in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

# (0028,0004) values read_dicom renders; pydicom converts the YBR family to RGB while decoding.
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def mask_bits_stored(arr: np.ndarray, bits_stored: int, signed: bool) -> tuple[np.ndarray, str | None]:
    """Clear (or sign-extend into) the bits above ``bits_stored``: overlays and junk live there in old files."""
    bits_allocated = arr.dtype.itemsize * 8
    if not np.issubdtype(arr.dtype, np.integer) or not 0 < bits_stored < bits_allocated:
        return arr, None
    if signed:
        shift = bits_allocated - bits_stored
        arr = (arr.astype(arr.dtype) << shift) >> shift  # arithmetic shift sign-extends
        return arr, f"bits_stored: {bits_stored} of {bits_allocated} bits kept, sign-extended"
    arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)
    return arr, f"bits_stored: {bits_stored} of {bits_allocated} bits kept, high bits cleared"


def modality(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Stored values → modality values (e.g. Hounsfield units) via the Modality LUT or Rescale Slope/Intercept.

    Enhanced multi-frame objects keep the rescale in the functional groups (shared or per frame); those are
    honoured frame by frame. Returns float64 values, the step description and ``meta["rescale"]``.
    """
    rescale_type = _str(ds.get("RescaleType")) or ("HU" if _str(ds.get("Modality")) == "CT" else None)
    if ds.get("ModalityLUTSequence"):
        desc = list(ds.ModalityLUTSequence[0].LUTDescriptor)
        out = apply_modality_lut(arr, ds).astype(np.float64)
        info = {"source": "ModalityLUTSequence", "entries": int(desc[0] or 65536), "type": rescale_type}
        return out, f"modality_lut: LUT sequence ({info['entries']} entries, first mapped {desc[1]})", info
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        info = {"source": "RescaleSlope/Intercept", "slope": slope, "intercept": intercept, "type": rescale_type}
        return out, f"modality_lut: rescale slope={slope:g} intercept={intercept:g}", info
    per_frame = _frame_rescales(ds)
    if per_frame:
        out = _apply_frame_rescales(arr, per_frame)
        slopes = sorted({s for s, _ in per_frame})
        intercepts = sorted({i for _, i in per_frame})
        info = {"source": "functional groups", "slope": slopes, "intercept": intercepts, "type": rescale_type}
        return out, f"modality_lut: functional-group rescale slope={slopes} intercept={intercepts}", info
    info = {"source": None, "slope": 1.0, "intercept": 0.0, "type": rescale_type}
    return arr.astype(np.float64), "modality_lut: none in file (identity)", info


def _frame_rescales(ds: Dataset) -> list[tuple[float, float]]:
    """(slope, intercept) for each frame from the enhanced functional groups, or [] when there are none."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    out = []
    for item in per_frame or [None]:
        found = None
        for group in (item, shared):
            seq = group.get("PixelValueTransformationSequence") if group is not None else None
            if seq and "RescaleSlope" in seq[0] and "RescaleIntercept" in seq[0]:
                found = (float(seq[0].RescaleSlope), float(seq[0].RescaleIntercept))
                break
        if found is None:
            return []
        out.append(found)
    return out


def _apply_frame_rescales(arr: np.ndarray, rescales: list[tuple[float, float]]) -> np.ndarray:
    out = arr.astype(np.float64)
    if len(rescales) == 1 or len({*rescales}) == 1:
        slope, intercept = rescales[0]
        return out * slope + intercept
    if out.ndim < 3 or out.shape[0] != len(rescales):
        raise ValueError(f"{len(rescales)} per-frame rescale values for pixel data of shape {out.shape}")
    for i, (slope, intercept) in enumerate(rescales):
        out[i] = out[i] * slope + intercept
    return out


@dataclass(frozen=True)
class Window:
    """One VOI window: centre and width in modality units, the VOI LUT function, and which of how many."""

    center: float
    width: float
    function: str
    index: int
    count: int


def find_window(ds: Dataset, index: int) -> Window | None:
    """The ``index``-th (0028,1050/1051) window, at top level or in the enhanced functional groups."""
    holder: Any = ds if "WindowCenter" in ds and "WindowWidth" in ds else None
    if holder is None:
        for group_seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            groups = ds.get(group_seq) or []
            seq = groups[0].get("FrameVOILUTSequence") if groups else None
            if seq and "WindowCenter" in seq[0] and "WindowWidth" in seq[0]:
                holder = seq[0]
                break
    if holder is None:
        return None
    centers, widths = _multi(holder["WindowCenter"].value), _multi(holder["WindowWidth"].value)
    count = min(len(centers), len(widths))
    if count == 0:
        return None
    if index >= count:
        raise IndexError(f"window index {index} requested but the file has {count} window(s)")
    function = (_str(holder.get("VOILUTFunction")) or "LINEAR").upper()
    return Window(float(centers[index]), float(widths[index]), function, index, count)


def apply_window(values: np.ndarray, win: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 LINEAR, C.11.2.1.3.2 LINEAR_EXACT and C.11.2.1.3.1 SIGMOID, output in [0, 1]."""
    x = values.astype(np.float64)
    if win.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - win.center) / win.width, -700, 700)))
    center, width = (win.center - 0.5, win.width - 1.0) if win.function == "LINEAR" else (win.center, win.width)
    out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    out[x <= center - width / 2] = 0.0
    out[x > center + width / 2] = 1.0
    return out


def window_is_valid(win: Window) -> bool:
    """The standard's lower bounds on width (>= 1 for LINEAR, > 0 otherwise) and a known function."""
    if not (np.isfinite(win.center) and np.isfinite(win.width)):
        return False
    if win.function == "LINEAR":
        return win.width >= 1
    return win.function in ("LINEAR_EXACT", "SIGMOID") and win.width > 0


def voi(values: np.ndarray, ds: Dataset, index: int | None) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Modality values → [0, 1] by the VOI LUT, else the window, else a linear min-max over the image.

    ``index`` picks among several windows / LUTs (0 = the first, what viewers show); ``None`` ignores the file's
    VOI and uses min-max. Returns the [0, 1] array, the step description and ``meta["voi"]``.
    """
    if index is not None and ds.get("VOILUTSequence"):
        seq = ds.VOILUTSequence
        if index >= len(seq):
            raise IndexError(f"VOI LUT index {index} requested but the file has {len(seq)} VOI LUT(s)")
        bits = int(seq[index].LUTDescriptor[2])
        ints = values.astype(np.int64) if np.all(np.mod(values, 1) == 0) else values
        out = apply_voi(ints, ds, index).astype(np.float64) / float(2**bits - 1)
        info = {"kind": "lut", "index": index, "count": len(seq), "bits": bits}
        which = f" (first of {len(seq)})" if len(seq) > 1 and index == 0 else f" ({index + 1} of {len(seq)})"
        return out, f"voi: VOI LUT sequence, {bits}-bit output{which if len(seq) > 1 else ''}", info
    win = find_window(ds, index) if index is not None else None
    if win is not None and window_is_valid(win):
        info = {"kind": "window", "center": win.center, "width": win.width, "function": win.function}
        info |= {"index": win.index, "count": win.count}
        which = f" ({win.index + 1} of {win.count})" if win.count > 1 else ""
        step = f"voi: window c={win.center:g} w={win.width:g} {win.function}{which}"
        return apply_window(values, win), step, info
    reason = "ignored on request" if index is None else "none in file"
    if win is not None:
        reason = f"window c={win.center:g} w={win.width:g} {win.function} is invalid, ignored"
    return _minmax(values, reason)


def _minmax(values: np.ndarray, reason: str) -> tuple[np.ndarray, str, dict[str, Any]]:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values, dtype=np.float64)
    info = {"kind": "minmax", "low": lo, "high": hi}
    return out, f"voi: {reason}; linear min-max over [{lo:g}, {hi:g}]", info


def _multi(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return [v for v in value if v is not None and v != ""]
    return [value] if value != "" else []


def _str(value: Any) -> str | None:
    return str(value).strip() if value not in (None, "") else None
