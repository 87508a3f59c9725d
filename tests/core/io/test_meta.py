"""What of a reader's metadata may be stored: an allowlist per reader, so an unvetted key never leaks."""

from __future__ import annotations

import pytest

from loupe.core.io import safe_meta


@pytest.mark.parametrize("fmt", ["dicom", "png", "jpeg", "tiff", "something-new"])
def test_only_allowlisted_keys_survive(fmt: str) -> None:
    meta = {"source_format": fmt, "path": "/data/Jane_Doe/film.dcm", "station_name": "XR-ROOM-3",
            "study_id": "S123", "study_instance_uid": "1.2.3", "institution": "St Elsewhere", "original_size": (2, 3),
            "modality": "CR", "bit_depth": 12}  # fmt: skip
    kept = safe_meta(meta)
    assert not {"path", "station_name", "study_id", "study_instance_uid", "institution"} & set(kept)
    assert kept["original_size"] == (2, 3)
    assert ("modality" in kept) == (fmt == "dicom") and ("bit_depth" in kept) == (fmt != "something-new")


def test_a_domain_declares_the_keys_it_adds() -> None:
    meta = {"source_format": "png", "tissue_fraction": 0.7, "operator_note": "x"}
    assert safe_meta(meta, extra=("tissue_fraction",)) == {"source_format": "png", "tissue_fraction": 0.7}
