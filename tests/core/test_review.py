"""Review-case helpers: pixels for display (never the stored file changed), window/level, findings from a row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.core.review import CaseContext, Layer, apply_window, default_case, downsample, findings_from, render_layer


def test_window_level_on_display_intensities() -> None:
    g = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(apply_window(g, 0.5, 1.0), g)  # the default shows the film as read
    np.testing.assert_allclose(apply_window(g, 0.5, 0.5), [0.0, 0.0, 0.5, 1.0, 1.0])  # narrower: more contrast
    np.testing.assert_allclose(apply_window(g, 0.25, 0.5), [0.0, 0.5, 1.0, 1.0, 1.0])  # lower level: brighter


def test_render_layer_downsamples_and_scales_by_the_significant_bits(tmp_path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    film = (np.linspace(0, 4095, 2000 * 1000).reshape(2000, 1000)).astype(np.uint16)
    info = PngInfo()
    info.add(b"sBIT", bytes([12]))
    path = tmp_path / "film.png"
    Image.fromarray(film).save(path, pnginfo=info)
    stored = path.read_bytes()
    shown = render_layer(Layer("film", "film", str(path)), max_side=500)
    assert shown.shape == (500, 250) and shown.max() == pytest.approx(1.0, abs=2e-3) and shown.min() >= 0.0
    assert path.read_bytes() == stored  # display copies only
    assert downsample(np.zeros((10, 4, 3)), 100).shape == (10, 4, 3)  # never upsampled


def test_findings_carry_scores_stored_thresholds_and_decisions() -> None:
    row = {"scores": [("Effusion", 0.7), ("Mass", 0.2)], "decisions": [("Effusion", True), ("Mass", False)],
           "thresholds": json.dumps({"Effusion": 0.5, "Mass": 0.3})}  # fmt: skip
    eff, mass = findings_from(row)
    assert (eff.label, eff.score, eff.threshold, eff.decision) == ("Effusion", 0.7, 0.5, True)
    assert mass.margin == pytest.approx(0.1) and mass.level == "file"
    assert findings_from({"scores": None, "thresholds": row["thresholds"]}) == ()  # a failed row said nothing


def test_default_case_resolves_the_input_and_artifacts(tmp_path: Path) -> None:
    row = {"path": "sub/a.png", "content_id": "sha256:ab", "status": "ok", "domain": "x", "model_name": "m",
           "frame": json.dumps({"width": 4, "height": 3}), "meta": json.dumps({"pipeline": ["decode"], "mode": "L"}),
           "artifacts": json.dumps([{"kind": "mask", "path": "p.parquet.artifacts/ab-mask.png",
                                     "frame": {"space": "file", "scale": 1.0}, "threshold": 0.5}])}  # fmt: skip
    case = default_case(row, [], CaseContext(tmp_path / "in", tmp_path))
    assert case.source == str(tmp_path / "in" / "sub" / "a.png") and case.layers[0].frame == {"width": 4, "height": 3}
    (mask,) = case.overlays
    assert mask.kind == "mask" and mask.path == str(tmp_path / "p.parquet.artifacts" / "ab-mask.png")
    assert case.metadata == {"mode": "L"} and case.model == {"model_name": "m"}
