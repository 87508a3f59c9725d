from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loupe.core.data import validate_manifest
from loupe.core.errors import UnsupportedInputError
from loupe.domains.cxr.adapters import chexpert, mimic_cxr_jpg, nih_chestxray14
from loupe.domains.cxr.labels import CHEXPERT_LABELS
from loupe.domains.cxr.labels import NIH14_LABELS as NIH_LABELS


def _chexpert_csv(tmp_path: Path) -> Path:
    rows = []
    for i, value in enumerate([1.0, 0.0, -1.0, np.nan]):
        row = {"Path": f"CheXpert-v1.0-small/train/patient0000{i % 2 + 1}/study1/view{i}_frontal.jpg"}
        row |= {"Sex": "Female", "Age": 60 + i, "Frontal/Lateral": "Frontal", "AP/PA": "AP"}
        row |= {label: np.nan for label in CHEXPERT_LABELS} | {"Edema": value}
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv"


@pytest.mark.parametrize(("policy", "uncertain_value"), [("ones", 1.0), ("zeros", 0.0), ("ignore", np.nan)])
def test_chexpert_uncertain_policy(tmp_path: Path, policy: str, uncertain_value: float) -> None:
    out = chexpert(_chexpert_csv(tmp_path), uncertain=policy)
    np.testing.assert_array_equal(out["Edema"].to_numpy(), [1.0, 0.0, uncertain_value, np.nan])
    assert out["group"].tolist() == ["patient00001", "patient00002", "patient00001", "patient00002"]
    assert out["Cardiomegaly"].isna().all() and out["meta_sex"].iloc[0] == "Female"
    assert validate_manifest(out, check_files=False) == []


def test_chexpert_rejects_unknown_policy_and_wrong_csv(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uncertain policy 'maybe'"):
        chexpert(_chexpert_csv(tmp_path), uncertain="maybe")
    pd.DataFrame({"Path": ["x"]}).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(UnsupportedInputError, match="lacks column"):
        chexpert(tmp_path / "other.csv")


def test_mimic_joins_metadata_and_labels(tmp_path: Path) -> None:
    pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3"],
            "subject_id": [10000032, 10000032, 19999999],
            "study_id": [50414267, 50414267, 51111111],
            "ViewPosition": ["PA", "LATERAL", "AP"],
        }
    ).to_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", index=False)
    labels = {label: [np.nan] for label in CHEXPERT_LABELS} | {"Pneumonia": [-1.0], "Edema": [1.0]}
    pd.DataFrame({"subject_id": [10000032], "study_id": [50414267], **labels}).to_csv(
        tmp_path / "mimic-cxr-2.0.0-chexpert.csv", index=False
    )
    out = mimic_cxr_jpg(
        tmp_path / "mimic-cxr-2.0.0-metadata.csv", tmp_path / "mimic-cxr-2.0.0-chexpert.csv", uncertain="ones"
    )
    assert out["path"].tolist() == ["files/p10/p10000032/s50414267/d1.jpg", "files/p10/p10000032/s50414267/d2.jpg"]
    assert out["Pneumonia"].tolist() == [1.0, 1.0] and out["group"].unique().tolist() == ["10000032"]
    assert out["meta_view"].tolist() == ["PA", "LATERAL"]


def test_nih_official_layout_and_unknown_finding(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "Image Index": ["00000001_000.png", "00000001_001.png"],
            "Finding Labels": ["Cardiomegaly|Effusion", "No Finding"],
            "Follow-up #": [0, 1],
            "Patient ID": [1, 1],
            "Patient Age": ["058Y", 58],
            "Patient Gender": ["M", "M"],
            "Patient Sex": ["M", "M"],
            "View Position": ["PA", "AP"],
        }
    )
    frame.to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    out = nih_chestxray14(tmp_path / "Data_Entry_2017.csv")
    assert out.loc[0, ["Cardiomegaly", "Effusion", "Mass"]].tolist() == [1.0, 1.0, 0.0]
    assert out.loc[1, list(NIH_LABELS)].sum() == 0 and out["meta_age"].tolist() == [58.0, 58.0]
    assert out["meta_sex"].tolist() == ["M", "M"] and out["group"].tolist() == ["1", "1"]
    frame.loc[0, "Finding Labels"] = "Cardiomegally"
    frame.to_csv(tmp_path / "typo.csv", index=False)
    with pytest.raises(UnsupportedInputError, match="unknown finding.*Cardiomegally"):
        nih_chestxray14(tmp_path / "typo.csv")


@pytest.mark.realdata
def test_nih_shared_labels_become_a_valid_manifest(shared_data: Path) -> None:
    root = shared_data / "cxr" / "nih14"
    out = nih_chestxray14(root / "labels.csv")
    assert len(out) == 621 and validate_manifest(out, root=root, labels=list(NIH_LABELS)) == []
    official = pd.read_csv(root / "labels.csv")  # its 0/1 columns must agree with Finding Labels
    np.testing.assert_array_equal(out[list(NIH_LABELS)].to_numpy(), official[list(NIH_LABELS)].to_numpy())
    assert {"meta_age", "meta_view"} <= set(out.columns)
