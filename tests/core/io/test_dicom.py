from __future__ import annotations

import csv
import importlib.metadata
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from loupe.core.errors import UnsupportedInputError
from loupe.core.io import read_any, read_dicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA = Path(str(importlib.metadata.distribution("pydicom-data").locate_file("data_store/data")))

# Compressed files that carry pixel data yet are broken on purpose in pydicom's own test suites.
KNOWN_BROKEN = {
    "JPEG-lossy.dcm": "non-conformant JPEG scan (pydicom's tests expect libjpeg error -1038)",
    "JPEG2000-embedded-sequence-delimiter.dcm": "a 266-byte stub codestream for a 1024x256 image (parser test)",
}
# (emri_small_jpeg_2k_lossless_too_short.dcm is truncated inside its pixel data element, which pydicom then drops:
# it is reported as "no (7FE0,0010) Pixel Data ... or it is truncated before its pixels".)
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName")


def installed_files() -> list[Path]:
    files = sorted(PYDICOM_FILES.rglob("*")) + sorted(PYDICOM_DATA.rglob("*"))
    return [f for f in files if f.is_file()]


def _outcome(path: Path) -> dict[str, str]:
    row = {"file": path.name, "compressed": _compressed(path)}
    try:
        img = read_dicom(path)
    except UnsupportedInputError as exc:
        return row | {"outcome": "UnsupportedInputError", "detail": str(exc).split(": ", 1)[-1][:120]}
    except Exception as exc:  # noqa: BLE001 - recorded, then the test fails on it
        return row | {"outcome": f"BUG {type(exc).__name__}", "detail": str(exc)[:120]}
    return row | {"outcome": "image", "detail": f"{img.array.shape} {img.meta['photometric_interpretation']}"}


def _compressed(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, force=True)
        has_pixels = "PixelData" in ds
        return "yes" if has_pixels and ds.file_meta.TransferSyntaxUID.is_encapsulated else "no"
    except Exception:  # noqa: BLE001 - not DICOM at all
        return "no"


def _write_table(rows: list[dict[str, str]], out: Path) -> None:
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "compressed", "outcome", "detail"])
        writer.writeheader()
        writer.writerows(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"\nDICOM outcome table ({len(rows)} files) written to {out}: {counts}")
    for r in rows:
        print(f"  {r['outcome']:22s} {r['compressed']:3s} {r['file']}: {r['detail']}")


def test_every_installed_dicom_gives_an_image_or_the_documented_error(tmp_path: Path) -> None:
    rows = [_outcome(f) for f in installed_files()]
    _write_table(rows, tmp_path / "dicom_outcomes.csv")
    bugs = [r for r in rows if r["outcome"].startswith("BUG")]
    assert not bugs, bugs
    undecoded = [r["file"] for r in rows if r["compressed"] == "yes" and r["outcome"] != "image"]
    assert sorted(undecoded) == sorted(KNOWN_BROKEN)
    outcome = {r["file"]: r["outcome"] for r in rows}
    assert outcome["SC_ybr_full_422_uncompressed.dcm"] == "image"  # native 4:2:2 is 2/3 the size, not truncated
    assert outcome["MR_truncated.dcm"] == outcome["rtplan.dcm"] == "UnsupportedInputError"
    assert sum(r["outcome"] == "image" for r in rows) >= 150
    assert sum(r["compressed"] == "yes" and r["outcome"] == "image" for r in rows) >= 50


@pytest.mark.realdata
def test_shared_chest_dicoms_read(shared_data: Path, tmp_path: Path) -> None:
    rows = [_outcome(f) for f in sorted((shared_data / "cxr" / "dicom").glob("*.dcm"))]
    _write_table(rows, tmp_path / "shared_dicom_outcomes.csv")
    assert len(rows) == 2 and all(r["outcome"] == "image" for r in rows), rows


def _reference(path: Path) -> np.ndarray:
    """pydicom's own modality LUT → VOI LUT / window, scaled to [0, 1] by the VOI output range, MONOCHROME1 flipped."""
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(pixel_array(ds, correct_unused_bits=True), ds)
    out = apply_voi_lut(values, ds, index=0).astype(np.float64)
    if ds.get("VOILUTSequence"):
        out /= 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    else:
        lo, hi = apply_windowing(np.array([-1e12, 1e12]), ds)
        out = (out - lo) / (hi - lo)
    return 1.0 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


LUT_FILES = [
    "CT_small.dcm",  # rescale, no window: compared on the modality step below
    "MR_small.dcm",
    "MR2_UNCI.dcm",  # rescale slope 3.77 + window, 12 of 16 bits
    "693_UNCI.dcm",  # signed 14-bit, CT rescale + window
    "RG1_UNCI.dcm",  # MONOCHROME1 CR chest
    "RG3_UNCI.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # first of two windows
    "J2K_pixelrep_mismatch.dcm",  # first of three windows, compressed
    "vlut_04.dcm",  # VOI LUT sequence
]


def _find(name: str) -> Path:
    return next(p for p in (PYDICOM_FILES / name, PYDICOM_DATA / name) if p.exists())


@pytest.mark.parametrize("name", [n for n in LUT_FILES if n != "CT_small.dcm"])
def test_voi_and_rescale_match_pydicom(name: str) -> None:
    img = read_dicom(_find(name))
    np.testing.assert_allclose(img.array, _reference(_find(name)), atol=1e-5)
    assert img.array.dtype == np.float32 and 0.0 <= img.array.min() and img.array.max() <= 1.0


@pytest.mark.parametrize("name", ["CT_small.dcm", "mlut_18.dcm", "693_UNCI.dcm"])
def test_modality_lut_matches_pydicom(name: str) -> None:
    """With VOI ignored, the output is a min-max of the modality values: undo it and compare with pydicom."""
    img = read_dicom(_find(name), voi_index=None)
    ds = pydicom.dcmread(_find(name))
    expected = apply_modality_lut(pixel_array(ds, correct_unused_bits=True), ds).astype(np.float64)
    lo, hi = img.meta["voi"]["low"], img.meta["voi"]["high"]
    np.testing.assert_allclose(img.array * (hi - lo) + lo, expected, rtol=1e-5, atol=1e-5 * (hi - lo))
    assert "voi: ignored on request" in img.meta["pipeline"][-1]


def _twin_mono2(src: Path, out: Path) -> Path:
    """The MONOCHROME2 twin of a MONOCHROME1 file: stored values inverted, window mirrored, same display."""
    ds = pydicom.dcmread(src)
    arr = pixel_array(ds, correct_unused_bits=True)
    top = 2 ** int(ds.BitsStored) - 1
    ds.PixelData = (top - arr.astype(np.int64)).astype(arr.dtype).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.PhotometricInterpretation = "MONOCHROME2"
    if "WindowCenter" in ds:  # LINEAR: the mirror of centre c over [0, top] is top - c + 1 (PS3.3 C.11.2.1.2)
        ds.WindowCenter = top - float(ds.WindowCenter) + 1
    ds.save_as(out, enforce_file_format=True)
    return out


def test_monochrome1_and_its_monochrome2_twin_are_identical(tmp_path: Path) -> None:
    src = _find("RG1_UNCI.dcm")
    mono1, mono2 = read_dicom(src), read_dicom(_twin_mono2(src, tmp_path / "twin.dcm"))
    assert mono1.meta["inverted"] and not mono2.meta["inverted"]
    np.testing.assert_allclose(mono1.array, mono2.array, atol=1e-6)
    assert "monochrome1: inverted" in mono1.meta["pipeline"][-1]


@pytest.mark.realdata
def test_shared_monochrome1_chest_matches_its_twin(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "cxr" / "dicom" / "Fake_MONOHR1.dcm"
    mono1, mono2 = read_dicom(src), read_dicom(_twin_mono2(src, tmp_path / "twin.dcm"))
    np.testing.assert_allclose(mono1.array, mono2.array, atol=1e-6)


def test_metadata_keeps_subgroup_fields_and_nothing_identifying() -> None:
    path = _find("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    meta = read_dicom(path).meta
    assert meta["modality"] == ds.Modality and meta["photometric_interpretation"] == "MONOCHROME1"
    assert meta["study_instance_uid"] == ds.StudyInstanceUID and meta["frames"] == 1
    assert meta["pixel_spacing"] is not None and meta["pixel_spacing_source"] in ("PixelSpacing", "ImagerPixelSpacing")
    text = repr(meta)
    for keyword in IDENTIFYING:
        value = str(ds.get(keyword) or "").strip()
        if len(value) > 3:
            assert value not in text, f"{keyword} leaked into meta"


def test_multiframe_gives_frames_first() -> None:
    img = read_dicom(_find("emri_small.dcm"))
    assert img.array.shape == (10, 64, 64) and img.meta["frames"] == 10


def test_first_of_several_windows_and_option_to_ignore() -> None:
    path = _find("MR-SIEMENS-DICOM-WithOverlays.dcm")
    first = read_dicom(path)
    assert first.meta["voi"]["index"] == 0 and first.meta["voi"]["count"] == 2
    second = read_dicom(path, voi_index=1)
    assert second.meta["voi"]["center"] != first.meta["voi"]["center"]
    assert read_dicom(path, voi_index=None).meta["voi"]["kind"] == "minmax"
    with pytest.raises(UnsupportedInputError, match="has 2 window"):
        read_dicom(path, voi_index=5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("MR_truncated.dcm", "truncated: \\(7FE0,0010\\) Pixel Data has 8,130 of 8,192 bytes"),
        ("rtplan.dcm", "no \\(7FE0,0010\\) Pixel Data \\(RT Plan Storage\\)"),
        ("README.txt", "not a DICOM file"),
    ],
)
def test_documented_errors_name_file_tag_and_fix(name: str, message: str) -> None:
    with pytest.raises(UnsupportedInputError, match=message) as info:
        read_dicom(_find(name))
    assert name in str(info.value) and "; " in str(info.value)


def test_missing_codec_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels.decoders.base import Decoder

    monkeypatch.setattr(Decoder, "is_available", property(lambda self: False))
    with pytest.raises(UnsupportedInputError, match="JPEG 2000.*pip install pylibjpeg"):
        read_dicom(_find("MR_small_jp2klossless.dcm"))


def test_unsupported_photometric_interpretation(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_find("MR_small.dcm"))
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(tmp_path / "hsv.dcm")
    with pytest.raises(UnsupportedInputError, match="\\(0028,0004\\) Photometric Interpretation 'HSV'.*re-export"):
        read_dicom(tmp_path / "hsv.dcm")


def test_absurd_dimensions_refused_before_decoding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_find("MR_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 100
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(UnsupportedInputError, match="more than the limit"):
        read_dicom(tmp_path / "huge.dcm")


def test_read_any_sniffs_content_not_extension(tmp_path: Path) -> None:
    disguised = tmp_path / "scan.png"
    disguised.write_bytes(_find("CT_small.dcm").read_bytes())
    img = read_any(disguised)
    assert img.meta["source_format"] == "dicom" and img.meta["rescale"]["type"] == "HU"


@pytest.mark.parametrize(
    ("value", "years"), [("045Y", 45.0), ("006M", 0.5), ("010D", 10 / 365.25), ("095Y", 90.0), ("", None), ("12", None)]
)
def test_age_in_years_is_capped_at_90(value: str, years: float | None) -> None:
    from loupe.core.io.dicom import age_years

    assert age_years(value) == pytest.approx(years) if years is not None else age_years(value) is None


def test_ages_over_89_are_aggregated(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_find("RG1_UNCI.dcm"))
    ds.PatientAge = "093Y"
    ds.save_as(tmp_path / "old.dcm")
    meta = read_dicom(tmp_path / "old.dcm").meta
    assert meta["patient_age"] == "090Y+" and meta["patient_age_years"] == 90.0


@pytest.mark.parametrize(
    ("stored", "kept", "years"),
    [
        ("94 years, Doe^John", None, None),  # free text: never copied, whatever it says
        ("95", None, None),  # malformed (no unit) and >= 90: not copied verbatim
        ("0097Y", None, None),  # too many digits for a DICOM age string
        ("97y", "090Y+", 90.0),  # a lower-case unit is still an age; >= 90 aggregated
        ("45Y", "045Y", 45.0),  # canonical form
        ("006M", "006M", 0.5),
    ],
)
def test_patient_age_is_normalised_or_dropped(
    tmp_path: Path, stored: str, kept: str | None, years: float | None
) -> None:
    ds = pydicom.dcmread(_find("RG1_UNCI.dcm"))
    ds.PatientAge = stored
    ds.save_as(tmp_path / "age.dcm")
    meta = read_dicom(tmp_path / "age.dcm").meta
    assert meta["patient_age"] == kept
    assert meta["patient_age_years"] == (pytest.approx(years) if years is not None else None)


def test_corrupt_geometry_value_is_named_not_defaulted() -> None:
    path = _find("badVR.dcm")  # (0028,0008) Number of Frames holds the text '1A'
    with pytest.raises(UnsupportedInputError) as err:
        read_dicom(path)
    assert str(err.value) == (
        f"{path}: (0028,0008) NumberOfFrames is '1A', not a whole number, so the pixel data cannot be laid out; "
        "the file is truncated or corrupt; re-export it from the PACS or modality"
    )


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR"])
@pytest.mark.parametrize("name", ["MR2_UNCI.dcm", "693_UNCI.dcm"])
def test_every_voi_lut_function_matches_pydicom(tmp_path: Path, name: str, function: str) -> None:
    """PS3.3 C.11.2.1.3: the window's VOI LUT Function changes the curve; each must match pydicom's."""
    ds = pydicom.dcmread(_find(name))
    ds.VOILUTFunction = function
    path = tmp_path / f"{function}.dcm"
    ds.save_as(path)
    img = read_dicom(path)
    assert img.meta["voi"]["function"] == function
    np.testing.assert_allclose(img.array, _reference(path), atol=1e-5)
