"""NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG label files → manifests (``path``, labels 1/0/NaN, ``group``,
``meta_*``), registered as the ``nih``, ``chexpert`` and ``mimic`` sources of ``loupe data convert``.

Each adapter reads the dataset's own label files, never its images, so it runs in seconds on the full sets.
Paths are relative to the dataset folder given in the docstring; validate with ``loupe data validate --root``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from loupe.core.data.manifest import GROUP, PATH
from loupe.core.io.common import input_error
from loupe.core.registry import ADAPTERS
from loupe.domains.cxr.labels import CHEXPERT_LABELS
from loupe.domains.cxr.labels import NIH14_LABELS as NIH_LABELS

UncertainPolicy = Literal["ones", "zeros", "ignore"]
_UNCERTAIN = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}


def _read_csv(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    p = Path(path)
    try:
        frame = pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001 - boundary: pandas raises many types on bad files
        raise input_error(p, f"cannot be read as CSV ({type(exc).__name__}: {exc})", "pass the dataset's CSV") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise input_error(p, f"lacks column(s) {missing}", f"pass the dataset's original CSV (needs {list(required)})")
    return frame


def nih_chestxray14(csv_path: str | Path, *, image_dir: str = "images") -> pd.DataFrame:
    """NIH ChestX-ray14 ``Data_Entry_2017.csv`` → manifest; labels from ``Finding Labels`` ('|'-separated).

    Paths are ``{image_dir}/{Image Index}`` relative to the CSV's folder. A finding outside the 14 is an error
    (a typo would otherwise silently read as "absent"). Keeps ``meta_age``, ``meta_sex`` (when the file has it),
    ``meta_view`` and ``meta_follow_up``.
    """
    frame = _read_csv(csv_path, ("Image Index", "Finding Labels", "Patient ID"))
    findings = frame["Finding Labels"].fillna("").astype(str).str.split("|")
    unknown = sorted({f.strip() for fs in findings for f in fs} - set(NIH_LABELS) - {"No Finding", ""})
    if unknown:
        raise input_error(csv_path, f"'Finding Labels' has unknown finding(s) {unknown}", f"use {list(NIH_LABELS)}")
    out = pd.DataFrame({PATH: [f"{image_dir}/{name}" for name in frame["Image Index"]]})
    for label in NIH_LABELS:
        out[label] = findings.apply(lambda fs, label=label: float(label in {f.strip() for f in fs})).to_numpy()
    out[GROUP] = frame["Patient ID"].astype(str).to_numpy()
    for column, meta in (("Patient Age", "meta_age"), ("Patient Sex", "meta_sex"), ("View Position", "meta_view")):
        if column in frame.columns:
            out[meta] = frame[column].map(_age if column == "Patient Age" else str).to_numpy()
    if "Follow-up #" in frame.columns:
        out["meta_follow_up"] = frame["Follow-up #"].to_numpy()
    return out


def _age(value: object) -> float:
    """Ages as numbers: ``58``, ``"58"`` and the older release's ``"058Y"`` all give 58."""
    match = re.match(r"\s*(\d+)", str(value))
    return float(match.group(1)) if match else np.nan


def _uncertain(values: pd.Series, policy: UncertainPolicy) -> np.ndarray:
    if policy not in _UNCERTAIN:
        raise ValueError(f"uncertain policy {policy!r} is not one of {list(_UNCERTAIN)}")
    numeric = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return np.where(numeric == -1, _UNCERTAIN[policy], numeric)


def chexpert(csv_path: str | Path, *, uncertain: UncertainPolicy = "ignore") -> pd.DataFrame:
    """CheXpert ``train.csv`` / ``valid.csv`` → manifest; -1 (uncertain) → 1 / 0 / NaN by ``uncertain``.

    Blank cells are unknown (NaN). Paths are kept as written (``CheXpert-v1.0-small/train/patient00001/...``), so
    the root is the folder that holds ``CheXpert-v1.0*``; the group is the patient id taken from the path.
    """
    frame = _read_csv(csv_path, ("Path", *CHEXPERT_LABELS))
    patient = frame["Path"].astype(str).str.extract(r"(patient\d+)", expand=False)
    if patient.isna().any():
        bad = frame.loc[patient.isna(), "Path"].iloc[0]
        raise input_error(csv_path, f"no 'patientNNNNN' folder in path {bad!r}", "pass CheXpert's own CSV")
    out = pd.DataFrame({PATH: frame["Path"].astype(str)})
    for label in CHEXPERT_LABELS:
        out[label] = _uncertain(frame[label], uncertain)
    out[GROUP] = patient.to_numpy()
    extra = {"Age": "meta_age", "Sex": "meta_sex", "AP/PA": "meta_view", "Frontal/Lateral": "meta_frontal_lateral"}
    for column, meta in extra.items():
        if column in frame.columns:
            out[meta] = frame[column].to_numpy()
    return out


def mimic_cxr_jpg(
    metadata_csv: str | Path, chexpert_csv: str | Path, *, uncertain: UncertainPolicy = "ignore"
) -> pd.DataFrame:
    """MIMIC-CXR-JPG ``mimic-cxr-2.0.0-metadata.csv`` joined with ``mimic-cxr-2.0.0-chexpert.csv`` → manifest.

    One row per image (DICOM id); studies without a labels row are dropped. Paths are
    ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` relative to the dataset folder; the group is the subject.
    """
    meta = _read_csv(metadata_csv, ("dicom_id", "subject_id", "study_id"))
    labels = _read_csv(chexpert_csv, ("subject_id", "study_id"))
    names = [c for c in CHEXPERT_LABELS if c in labels.columns]
    joined = meta.merge(labels[["subject_id", "study_id", *names]], on=["subject_id", "study_id"], how="inner")
    subject, study = joined["subject_id"].astype(int).astype(str), joined["study_id"].astype(int).astype(str)
    path = "files/p" + subject.str[:2] + "/p" + subject + "/s" + study + "/" + joined["dicom_id"].astype(str) + ".jpg"
    out = pd.DataFrame({PATH: path})
    for label in names:
        out[label] = _uncertain(joined[label], uncertain)
    out[GROUP] = subject.to_numpy()
    if "ViewPosition" in joined.columns:
        out["meta_view"] = joined["ViewPosition"].to_numpy()
    out["meta_study"] = study.to_numpy()
    return out


ADAPTERS.register("nih", nih_chestxray14, domain="cxr", inputs=("DATA_ENTRY_CSV",),
                  doc="NIH ChestX-ray14 Data_Entry_2017.csv (or the shared labels.csv)")  # fmt: skip
ADAPTERS.register("chexpert", chexpert, domain="cxr", inputs=("TRAIN_CSV",), uncertain=True,
                  doc="CheXpert train.csv / valid.csv")  # fmt: skip
ADAPTERS.register("mimic", mimic_cxr_jpg, domain="cxr", inputs=("METADATA_CSV", "CHEXPERT_CSV"), uncertain=True,
                  doc="MIMIC-CXR-JPG metadata + chexpert label CSVs")  # fmt: skip
