from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loupe.core.data import align_labels, label_columns, read_manifest, validate_manifest, write_manifest
from loupe.core.errors import UnsupportedInputError


def _frame(tmp_path: Path) -> pd.DataFrame:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    return pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png"],
            "Effusion": [1.0, 0.0, np.nan],
            "Mass": [0, 1, 1],
            "group": ["p1", "p2", "p3"],
            "split": ["train", "val", "test"],
            "meta_age": [50, 60, 70],
        }
    )


def test_valid_manifest_has_no_problems(tmp_path: Path) -> None:
    frame = _frame(tmp_path)
    assert validate_manifest(frame, root=tmp_path) == []
    assert label_columns(frame) == ["Effusion", "Mass"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    frame = _frame(tmp_path)
    frame.loc[1, "Effusion"] = -1  # uncertain CheXpert value left in
    frame.loc[2, "path"] = "a.png"  # duplicate
    frame.loc[2, "group"] = "p1"  # p1 now in train and test
    frame.loc[0, "split"] = "training"
    frame = pd.concat([frame, pd.DataFrame([{"path": "gone.png", "Effusion": 1, "Mass": 0, "group": "p9"}])])
    frame = frame.reset_index(drop=True)
    text = "\n".join(str(p) for p in validate_manifest(frame, root=tmp_path, labels=["Effusion", "Mass", "Edema"]))
    assert "label column 'Edema' is missing" in text
    assert "label 'Effusion' (rows 1)" in text and "-1" in text and "uncertain policy" in text
    assert "path 'a.png' (rows 0, 2): listed 2 times" in text
    assert "row 3 (gone.png): file not found" in text
    assert "unknown split name(s) training" in text
    assert "group 'p1': is in 2 splits" in text


def test_missing_required_columns(tmp_path: Path) -> None:
    text = " ".join(str(p) for p in validate_manifest(pd.DataFrame({"x": [1]}), check_files=False))
    assert "'path' is missing" in text and "'group' is missing" in text


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_round_trip_keeps_unknown_as_nan(tmp_path: Path, suffix: str) -> None:
    frame = _frame(tmp_path)
    back = read_manifest(write_manifest(frame, tmp_path / f"m{suffix}"))
    assert np.isnan(back.loc[2, "Effusion"]) and back["group"].tolist() == ["p1", "p2", "p3"]


def test_unreadable_manifest_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UnsupportedInputError, match="cannot be read"):
        read_manifest(tmp_path / "bad.parquet")


def test_align_labels_frame_and_array(tmp_path: Path) -> None:
    frame = _frame(tmp_path)
    aligned, report = align_labels(frame, ["Effusion", "Mass"], ["Mass", "Edema"])
    assert list(aligned.columns[-2:]) == ["Mass", "Edema"] and "Effusion" not in aligned.columns
    assert aligned["Edema"].isna().all() and "path" in aligned.columns
    assert report.kept == ("Mass",) and report.missing == ("Edema",) and report.dropped == ("Effusion",)
    arr, _ = align_labels(np.array([[1, 0], [0, 1]]), ["Effusion", "Mass"], ["Mass", "Edema"])
    np.testing.assert_array_equal(arr, [[0, np.nan], [1, np.nan]])
    with pytest.raises(ValueError, match="do not match 3"):
        align_labels(np.zeros((2, 2)), ["a", "b", "c"], ["a"])
