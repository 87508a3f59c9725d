"""`loupe deid`: seeded PHI never reaches OUT, pseudonyms are consistent, pixels are kept, bad files are rows."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from loupe.core.errors import ConfigError
from loupe.core.io import read_any, read_dicom
from loupe.workflows.cli import app
from loupe.workflows.deid import KEY_ENV, REPORT_NAME, deidentify, load_key

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2
NAME, PID, BIRTH, ACCESSION = "SEEDED^PHI", "SEEDPID4242", "19471103", "ACC98765X"
INSTITUTION, PRIVATE, FILE_NAME = "Seeded Memorial Hospital", "SEEDED-PRIVATE-7731", "SEEDED_NAME_Jones"
SEEDED = [NAME, "SEEDED PHI", PID, BIRTH, ACCESSION, INSTITUTION, PRIVATE, FILE_NAME, "OTHERPID777", "OTHER^PATIENT"]


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
    return str(path)


def _seed(src: str, dst: Path, *, name: str = NAME, pid: str = PID, study_date: str | None = None, **extra) -> Path:
    """A real DICOM file with PHI written into its header (standard, nested and private elements)."""
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, BIRTH
    ds.AccessionNumber, ds.InstitutionName = ACCESSION, INSTITUTION
    ds.StudyDescription = f"follow-up of {name}"
    ds.PatientAge, ds.PatientSex = "077Y", "F"
    other = pydicom.Dataset()
    other.PatientID = pid
    ds.OtherPatientIDsSequence = [other]
    ds.private_block(0x0011, "SEEDED CREATOR", create=True).add_new(0x01, "LO", PRIVATE)
    if study_date:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _png_with_text(path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", NAME)
    info.add_text("Comment", PID, zip=True)
    info.add_itxt("Description", INSTITUTION)
    pixels = np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 17
    Image.fromarray(pixels).save(path, pnginfo=info)


def _jpeg_with_exif(path: Path) -> None:
    exif = Image.Exif()
    exif[0x010E], exif[0x013B], exif[0x0112] = NAME, INSTITUTION, 6  # ImageDescription, Artist, Orientation
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), comment=ACCESSION.encode(), quality=90)


def _build_input(root: Path, outside: Path) -> Path:
    src = root / "in"
    patient = src / "SEEDED^PHI_folder"
    mr = _seed(_testfile("MR_small.dcm"), patient / "mr.dcm", study_date="20010305")
    source = pydicom.Dataset()  # the CT names the MR as its source: the reference must follow the remapped UID
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = (
        pydicom.dcmread(mr).SOPClassUID,
        pydicom.dcmread(mr).SOPInstanceUID,
    )
    _seed(_testfile("CT_small.dcm"), patient / f"{FILE_NAME}.dcm", study_date="20040119", SourceImageSequence=[source])
    _seed(_testfile("RG1_UNCR.dcm"), src / "other" / "cr.dcm", name="OTHER^PATIENT", pid="OTHERPID777")
    _seed(_testfile("RG1_J2KR.dcm"), src / "other" / "cr_j2k.dcm", name="OTHER^PATIENT", pid="OTHERPID777")
    _seed(_testfile("CT_small.dcm"), src / "burned.dcm", BurnedInAnnotation="YES")
    _seed(_testfile("US1_UNCR.dcm"), src / "us.dcm")  # ultrasound without a BurnedInAnnotation flag
    _seed(_testfile("CT_small.dcm"), src / "residual.dcm", ManufacturerModelName=NAME)  # an element no rule covers
    _png_with_text(src / "photo.png")
    _jpeg_with_exif(src / "photo.jpg")
    Image.fromarray(np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)).save(
        src / "scan.tif", tiffinfo={270: NAME, 315: INSTITUTION, 305: PID}
    )
    (src / os.fsdecode(b"caf\xe9_" + FILE_NAME.encode() + b".png")).write_bytes((src / "photo.png").read_bytes())
    (src / "notes.txt").write_text(f"{NAME} {PID}")
    (src / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff")
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "photo.png", outside / "secret.png")
    (src / "escape.png").symlink_to(outside / "secret.png")
    os.mkfifo(src / "pipe.dcm")
    return src


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("deid")
    src = _build_input(base, base / "outside")
    out, mapping = base / "out", base / "private" / "map.csv"
    summary = deidentify(src, out, KEY, map_path=mapping)
    rows = {r["input"]: r for r in _rows(mapping)}
    report = {r["file_id"]: r for r in _rows(out / REPORT_NAME)}
    return {"src": src, "out": out, "map": mapping, "summary": summary, "rows": rows, "report": report}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _output(run: dict, rel: str) -> Path:
    row = run["rows"][rel]
    assert row["status"] == "ok", row
    return run["out"] / row["output"]


def test_no_seeded_value_reaches_any_byte_under_out(run: dict) -> None:
    files = [p for p in run["out"].rglob("*") if p.is_file()]
    assert len(files) >= 10
    needles = {v.encode() for v in SEEDED} | {v.upper().encode() for v in SEEDED} | {KEY.encode()}
    for path in files:
        data = path.read_bytes() + os.fsencode(path.name)
        found = [n for n in needles if n in data]
        assert not found, f"{path.name} holds {found}"
    assert KEY.encode() not in run["map"].read_bytes()  # the key is written nowhere, not even in the private map


def test_statuses_and_counts(run: dict) -> None:
    s, rows = run["summary"], run["rows"]
    assert s["files"] == len(rows) == 15
    assert rows["burned.dcm"]["status"] == "quarantined" and "BurnedInAnnotation is YES" in rows["burned.dcm"]["detail"]
    assert rows["us.dcm"]["status"] == "quarantined" and "modality US" in rows["us.dcm"]["detail"]
    assert rows["residual.dcm"]["status"] == "quarantined" and "PatientName" in rows["residual.dcm"]["detail"]
    assert rows["notes.txt"]["status"] == "skipped"
    for bad in ("broken.dcm", "escape.png", "pipe.dcm"):
        assert rows[bad]["status"] == "failed", rows[bad]
    assert "outside IN" in rows["escape.png"]["detail"] and "FIFO" in rows["pipe.dcm"]["detail"]
    assert (s["ok"], s["quarantined"], s["skipped"], s["failed"]) == (8, 3, 1, 3)
    quarantine = list(_rows(run["out"] / "quarantine.csv"))
    assert {q["file_id"] for q in quarantine} == {rows[r]["file_id"] for r in ("burned.dcm", "us.dcm", "residual.dcm")}
    names = {p.name for p in run["out"].iterdir()}
    assert not any(rows[r]["file_id"] in n for r in ("burned.dcm", "us.dcm", "notes.txt") for n in names)


def test_non_utf8_name_is_processed_and_mapped(run: dict) -> None:
    rel = os.fsdecode(b"caf\xe9_" + FILE_NAME.encode() + b".png").encode("utf-8", "surrogateescape")
    recorded = rel.decode("utf-8", "backslashreplace")
    assert recorded in run["rows"]
    assert read_any(_output(run, recorded)).array.shape == (48, 40)


def test_same_patient_same_pseudonym_other_patient_differs(run: dict) -> None:
    ct = pydicom.dcmread(_output(run, f"SEEDED^PHI_folder/{FILE_NAME}.dcm"))
    mr = pydicom.dcmread(_output(run, "SEEDED^PHI_folder/mr.dcm"))
    cr = pydicom.dcmread(_output(run, "other/cr.dcm"))
    assert ct.PatientID == mr.PatientID != PID and str(ct.PatientName) == str(mr.PatientName) != NAME
    assert cr.PatientID != ct.PatientID and str(cr.PatientName) != str(ct.PatientName)
    assert "OtherPatientIDsSequence" not in ct  # X in Table E.1-1
    assert ct.SourceImageSequence[0].ReferencedSOPInstanceUID == mr.SOPInstanceUID  # UIDs remapped consistently
    assert run["report"][run["rows"][f"SEEDED^PHI_folder/{FILE_NAME}.dcm"]["file_id"]]["patient"] == ct.PatientID


def test_dates_shift_per_patient_with_order_kept(run: dict) -> None:
    def when(ds: pydicom.Dataset) -> dt.datetime:
        return dt.datetime.strptime(ds.StudyDate + ds.StudyTime[:6].ljust(6, "0"), "%Y%m%d%H%M%S")

    rels = (f"SEEDED^PHI_folder/{FILE_NAME}.dcm", "SEEDED^PHI_folder/mr.dcm")
    (ct, mr), (ct0, mr0) = ([pydicom.dcmread(p) for p in paths] for paths in
                            ([_output(run, r) for r in rels], [run["src"] / r for r in rels]))  # fmt: skip
    shift = when(ct0) - when(ct)
    assert shift == when(mr0) - when(mr)  # one shift per patient, to the second
    assert dt.timedelta(days=62) <= shift <= dt.timedelta(days=731)
    assert when(mr) < when(ct)
    assert ct.PatientBirthDate == "" and "PatientAge" not in ct and ct.PatientSex == ""  # basic profile: Z / X
    report = run["report"][run["rows"]["SEEDED^PHI_folder/mr.dcm"]["file_id"]]
    assert report["date_shift_applied"] == "yes" and int(report["private_removed"]) >= 2


def test_dicom_header_profile_pixels_and_reader(run: dict) -> None:
    cases = (f"SEEDED^PHI_folder/{FILE_NAME}.dcm", "CT_small.dcm"), ("other/cr.dcm", "RG1_UNCR.dcm")
    for rel, src in (*cases, ("other/cr_j2k.dcm", "RG1_J2KR.dcm")):  # native and JPEG 2000 (encapsulated) pixels
        out = pydicom.dcmread(_output(run, rel))
        orig = pydicom.dcmread(_testfile(src))
        assert out.PixelData == orig.PixelData
        assert not any(e.tag.is_private for e in out.iterall())
        assert "StudyDescription" not in out  # X in Table E.1-1
        assert out.SOPInstanceUID != orig.SOPInstanceUID and out.StudyInstanceUID != orig.StudyInstanceUID
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
        assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        np.testing.assert_array_equal(read_dicom(_output(run, rel)).array, read_dicom(_testfile(src)).array)


def _png_chunks(data: bytes) -> list[bytes]:
    pos, kinds = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def test_png_jpeg_tiff_metadata_gone_pixels_equal(run: dict) -> None:
    src = run["src"]
    png = _output(run, "photo.png")
    assert not {b"tEXt", b"zTXt", b"iTXt"} & set(_png_chunks(png.read_bytes()))
    np.testing.assert_array_equal(read_any(png).array, read_any(src / "photo.png").array)
    jpg = _output(run, "photo.jpg")
    with Image.open(jpg) as im:
        assert dict(im.getexif()) == {0x0112: 6}  # only the orientation survives, so the view is unchanged
        assert "comment" not in im.info and "xmp" not in im.info and "icc_profile" not in im.info
    np.testing.assert_array_equal(read_any(jpg).array, read_any(src / "photo.jpg").array)
    raw = read_any(jpg).meta
    assert raw["orientation_applied"]
    tif = _output(run, "scan.tif")
    with Image.open(tif) as im:
        assert not {270, 305, 315} & set(im.tag_v2)
    np.testing.assert_array_equal(read_any(tif).array, read_any(src / "scan.tif").array)


def test_resume_skips_done_files_and_retries_failed(run: dict, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(run["src"], src, symlinks=True, ignore=shutil.ignore_patterns("pipe.dcm"))
    first = deidentify(src, out, KEY)
    assert first["failed"] == 2
    with pytest.raises(ConfigError, match="already holds"):
        deidentify(src, out, KEY)
    with pytest.raises(ConfigError, match="another key"):
        deidentify(src, out, "x" * 40, resume=True)
    shutil.copy(_testfile("CT_small.dcm"), src / "broken.dcm")  # the user fixes the bad file
    again = deidentify(src, out, KEY, resume=True)
    assert again["resumed"] == first["ok"] + first["quarantined"] + first["skipped"]
    assert again["ok"] == first["ok"] + 1 and again["failed"] == 1
    # the same key names the files the same way in every run; the fixed file joins them
    fixed = run["rows"]["broken.dcm"]["file_id"] + ".dcm"
    assert {p.name for p in out.glob("*.dcm")} == {p.name for p in run["out"].glob("*.dcm")} | {fixed}


def test_same_key_same_output_across_runs_other_key_differs(run: dict, tmp_path: Path) -> None:
    src = tmp_path / "in"
    _seed(_testfile("MR_small.dcm"), src / "again.dcm", study_date="20010305")
    same, other = tmp_path / "same", tmp_path / "other"
    deidentify(src, same, KEY)
    deidentify(src, other, "y" * 64)
    ds_same, ds_other = (pydicom.dcmread(next(d.glob("*.dcm"))) for d in (same, other))
    reference = pydicom.dcmread(_output(run, "SEEDED^PHI_folder/mr.dcm"))
    assert ds_same.PatientID == reference.PatientID and ds_same.StudyDate == reference.StudyDate
    assert ds_other.PatientID != reference.PatientID
    assert {p.name for p in same.glob("*.dcm")} != {p.name for p in other.glob("*.dcm")}


def test_key_is_required_and_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secrets.token_hex"):
        load_key(None, env={})
    with pytest.raises(ConfigError, match="at least 32"):
        load_key(None, env={KEY_ENV: "short"})
    (tmp_path / "k").write_text(KEY + "\n")
    assert load_key(tmp_path / "k", env={}) == KEY.encode()
    with pytest.raises(ConfigError, match="cannot be read"):
        load_key(tmp_path / "missing", env={})


def test_map_and_out_placement_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_testfile("CT_small.dcm"), src / "a.dcm")
    with pytest.raises(ConfigError, match="inside IN or OUT"):
        deidentify(src, tmp_path / "out", KEY, map_path=tmp_path / "out" / "map.csv")
    with pytest.raises(ConfigError, match="overlap"):
        deidentify(src, src / "out", KEY)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user data")
    with pytest.raises(ConfigError, match="nothing is overwritten"):
        deidentify(src, tmp_path / "taken", KEY)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "user data"


def test_retain_patient_characteristics_caps_age(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _seed(_testfile("CT_small.dcm"), src / "old.dcm", PatientAge="094Y")
    deidentify(src, tmp_path / "out", KEY, retain_patient_characteristics=True)
    ds = pydicom.dcmread(next((tmp_path / "out").glob("*.dcm")))
    assert (ds.PatientAge, ds.PatientSex) == ("090Y", "F")
    assert "113108" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


def test_png_bomb_and_truncation_fail_as_rows(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    header = (64).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = zlib.compress(b"\0" * 10_000_000)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    (src / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bomb) + chunk(b"IEND", b"")
    )
    buf = io.BytesIO()
    Image.new("L", (16, 16)).save(buf, format="PNG")
    (src / "cut.png").write_bytes(buf.getvalue()[:-20])
    summary = deidentify(src, tmp_path / "out", KEY, map_path=tmp_path / "map.csv")
    assert summary["failed"] == 2
    detail = {r["input"]: r["detail"] for r in _rows(tmp_path / "map.csv")}
    assert "decompression bomb" in detail["bomb.png"] and "truncated" in detail["cut.png"]


def test_cli_exit_codes_and_summary(tmp_path: Path) -> None:
    src = tmp_path / "in"
    _seed(_testfile("CT_small.dcm"), src / "a.dcm")
    (tmp_path / "key").write_text(KEY)
    runner = CliRunner()
    result = runner.invoke(app, ["deid", str(src), str(tmp_path / "out")], env={KEY_ENV: ""})
    assert result.exit_code == 2 and "secrets.token_hex" in result.output
    key = ["--key-file", str(tmp_path / "key")]
    result = runner.invoke(app, ["deid", str(src), str(tmp_path / "out"), *key], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "1 written" in _flat(result.output) and NAME not in result.output
    (src / "b.dcm").write_bytes(b"\0" * 128 + b"DICM")
    result = runner.invoke(app, ["deid", str(src), str(tmp_path / "out"), *key, "--resume"], terminal_width=200)
    assert result.exit_code == 1 and "1 done by an earlier run" in _flat(result.output)


def _flat(text: str) -> str:
    """The CLI's table as one line of words (rich wraps cells and draws borders)."""
    return " ".join(re.sub(r"[│┌┐└┘─┬┴├┤┼]", " ", text).split())


@pytest.mark.realdata
def test_shared_chest_dicom(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    films = sorted((shared_data / "cxr" / "dicom").glob("*.dcm"))
    for i, film in enumerate(films):
        _seed(str(film), src / f"{FILE_NAME}_{i}.dcm")
    summary = deidentify(src, tmp_path / "out", KEY)
    assert summary["ok"] == len(films) == 2
    outs = sorted((tmp_path / "out").glob("*.dcm"))
    for path in outs:
        data = path.read_bytes()
        assert not any(v.encode() in data for v in SEEDED)
        assert read_dicom(path).array.shape == (1024, 1024)
    assert len({pydicom.dcmread(p).PatientID for p in outs}) == 1
