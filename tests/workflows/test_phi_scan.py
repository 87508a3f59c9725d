"""No patient identifier reaches anything the suite writes.

PHI is seeded into the headers of real chest DICOM files (pydicom-data's CR film, the shared SIIM film) and into a
folder and a file name. Two paths are checked, each with a binary-safe scan of every byte written (tables, parts,
Grad-CAM files, the MLflow store and its artifacts, the review store, the console output):

1. ``loupe deid`` → ``loupe score --explain`` (tracked in MLflow) → a review decision;
2. ``loupe score --pseudonymise-paths`` straight on the identified files (what the scoring side itself keeps).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from loupe.workflows.review.store import CaseRef, ReviewStore

SEEDED = {
    "PatientName": "Zyxwarth^Quillon",
    "PatientID": "PHI-ID-7744113",
    "PatientBirthDate": "19411107",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "Saint Vexmoor Hospital",
    "ReferringPhysicianName": "Dr^Plomquist",
    "OtherPatientIDs": "ALT-55443322",
}
FOLDER = "Zyxwarth_Quillon"  # a folder named after the patient
NEEDLES = [v.encode() for v in SEEDED.values()] + [b"Zyxwarth", b"Quillon", b"Vexmoor", b"Plomquist", b"7744113"]
KEY = "k" * 12 + "-secret-for-the-phi-test-" + "z" * 12


def _seed(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    for k, v in SEEDED.items():
        setattr(ds, k, v)
    ds.PatientAge = "093Y"
    ds.add_new(0x00111010, "LO", "Zyxwarth private note")  # a private creator block's value
    ds.private_block(0x0029, "SEEDED CREATOR", create=True).add_new(0x10, "LO", "Quillon in a private tag")
    ds.save_as(dst)


@pytest.fixture
def identified(tmp_path: Path, shared_data: Path) -> Path:
    root = tmp_path / "identified" / FOLDER
    root.mkdir(parents=True)
    _seed(Path(get_testdata_file("RG1_UNCR.dcm", download=False)), root / "Zyxwarth_Quillon_chest.dcm")
    _seed(shared_data / "cxr" / "dicom" / "Fake_MONOHR1.dcm", root / "followup_Quillon.dcm")
    for p in root.iterdir():  # the seeding worked: the needles are in the input
        assert b"Zyxwarth" in p.read_bytes()
    return tmp_path / "identified"


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loupe.workflows.cli", *args], capture_output=True, env=env,
                          timeout=300)  # fmt: skip


def _scan(roots: list[Path], extra: bytes = b"") -> list[str]:
    """Every (file, needle) where a seeded value appears, as bytes (also case-folded and UTF-16)."""
    hits = []
    blobs: list[tuple[str, bytes]] = [("console output", extra)]
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                blobs.append((str(p), p.read_bytes()))
            hits += [f"file name {p}" for n in NEEDLES if n.decode().lower() in p.name.lower()]
    for where, data in blobs:
        low = data.lower()
        for n in NEEDLES:
            if n.lower() in low or n.decode().encode("utf-16-le") in data:
                hits.append(f"{where}: {n.decode()}")
    return hits


def test_deid_then_score_explain_track_and_review_leak_nothing(
    tmp_path: Path, identified: Path, model_dir: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LOUPE_HOME": str(work / "home"), "OMP_NUM_THREADS": "1", "LOUPE_DEID_KEY": KEY}
    store = f"sqlite:///{work / 'mlflow.db'}"
    deid = _run(["deid", str(identified), str(work / "deid")], env)
    assert deid.returncode == 0, deid.stdout.decode()[-2000:] + deid.stderr.decode()[-2000:]
    scored = _run(["score", "cxr", "--input", str(work / "deid"), "--model", f"local-dir:{model_dir}",
                   "--out", str(work / "preds.parquet"), "--explain", "--tracking-uri", store,
                   "--num-workers", "1"], env)  # fmt: skip
    assert scored.returncode == 0, scored.stdout.decode()[-2000:] + scored.stderr.decode()[-2000:]
    preds = pd.read_parquet(work / "preds.parquet")
    assert (preds.status == "ok").sum() == 2 and preds.meta.notna().all()
    assert any((work / "preds.parquet.artifacts").rglob("*.png"))  # the Grad-CAM maps and pictures
    row = preds.iloc[0]
    reviews = ReviewStore(work / "reviews.sqlite")
    reviews.decide("dr-a", CaseRef("cxr", row.content_id, row.path, row.model_name, str(row.model_version),
                                   row.weights_sha256), "Pneumonia", "accept", "positive", comment="seen")  # fmt: skip
    assert len(reviews.actions("cxr")) == 1
    hits = _scan([work], deid.stdout + deid.stderr + scored.stdout + scored.stderr)
    assert not hits, hits[:10]
    assert len(list(work.rglob("*"))) > 10  # the scan saw the tables, artifacts, MLflow store and review store


def test_scoring_identified_files_with_pseudonymised_paths_keeps_no_identifier(
    tmp_path: Path, identified: Path, model_dir: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LOUPE_HOME": str(work / "home"), "OMP_NUM_THREADS": "1", "LOUPE_DEID_KEY": KEY}
    store = f"sqlite:///{work / 'mlflow.db'}"
    (identified / FOLDER / "Zyxwarth_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # a failed row
    args = ["score", "cxr", "--input", str(identified), "--model", f"local-dir:{model_dir}", "--out",
            str(work / "preds.parquet"), "--explain", "--tracking-uri", store, "--num-workers", "1"]  # fmt: skip
    scored = _run([*args, "--pseudonymise-paths"], env)
    assert scored.returncode == 1, scored.stdout.decode()[-2000:] + scored.stderr.decode()[-2000:]
    preds = pd.read_parquet(work / "preds.parquet")
    assert (preds.status == "ok").sum() == 2 and preds.path.str.match(r"p-[0-9a-f]{24}\.dcm$").all()
    assert "093Y" not in preds.meta.str.cat() and "090Y+" in preds.meta.str.cat()
    hits = _scan([work], scored.stdout + scored.stderr)
    assert not hits, hits[:10]
    again = _run([*args, "--pseudonymise-paths", "--resume"], env)  # same key: same pseudonyms, all resumed
    assert again.returncode == 1 and b"2 already scored" in again.stdout, again.stdout.decode()[-1500:]
    named = tmp_path / "named"  # without the option, names are recorded: the needle check itself is live
    plain = _run(["score", "cxr", "--input", str(identified), "--model", f"local-dir:{model_dir}", "--out",
                  str(named / "p.parquet"), "--no-track", "--num-workers", "1"], env)  # fmt: skip
    assert plain.returncode == 1 and any("Zyxwarth" in h for h in _scan([named]))
