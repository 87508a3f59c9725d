"""Review cases from predictions tables: the chest X-ray case, from a real scoring run over real DICOM."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file

from loupe.core.review import load_overlay, render_layer
from loupe.workflows.review import review_cases
from loupe.workflows.scoring import ScoreOptions, score


def test_film_case_with_window_heatmap_findings_and_clinical_metadata(tmp_path: Path, make_model) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for name in ("RG1_UNCR.dcm", "CT_small.dcm"):
        shutil.copyfile(get_testdata_file(name, download=False), root / name)
    model = make_model(tmp_path / "model", modalities=("CR", "DX"))
    out = tmp_path / "p.parquet"
    score(ScoreOptions(domain="cxr", input=root, model=f"local-dir:{model}", out=out, track=False, explain=True,
                       num_workers=0))  # fmt: skip
    cases = {c.path: c for c in review_cases(out)}
    film = cases["RG1_UNCR.dcm"]
    (layer,) = film.layers
    assert layer.kind == "film" and layer.window == (0.5, 1.0) and layer.frame == {"width": 1841, "height": 1955}
    shown = render_layer(layer, max_side=512)
    assert max(shown.shape) == 512 and 0.0 <= shown.min() < shown.max() <= 1.0
    (heat,) = film.overlays
    assert heat.kind == "heatmap" and load_overlay(heat).shape == (32, 32)
    assert [f.label for f in film.findings] == ["Effusion", "Pneumonia"]
    assert next(f for f in film.findings if f.label == "Pneumonia").threshold == 0.3
    assert list(film.metadata)[:2] == ["modality", "view_position"] and film.metadata["modality"] == "CR"
    assert film.model["model_name"] == "tiny-cxr" and film.case_id.startswith("sha256:")
    ct = cases["CT_small.dcm"]  # refused as out of scope: no findings, but the reviewer sees why
    assert ct.findings == () and "outside the scope" in ct.status and ct.metadata["modality"] == "CT"
