"""The forensics review case, from rows as the scoring tables hold them: a clip on its representative frame with
that frame's faces, a per-frame timeline (faceless frames kept as points without a score), a picture with its mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.review import CaseContext
from loupe.domains.forensics.review import forensics_case, frame_timeline

CTX = CaseContext(Path("/in"), Path("/tables"))
THUMB = {"kind": "thumbnail", "path": "t.parquet.artifacts/ab12-thumbnail.png",
         "frame": {"space": "file", "scale": 0.8, "frame_index": 50, "time_s": 2.0}}  # fmt: skip


def clip_row(**changes: Any) -> dict[str, Any]:
    row = {"path": "clips/a.mp4", "content_id": "sha256:ab12", "domain": "forensics", "status": "ok",
           "scores": [("Fake", 0.7)], "decisions": [("Fake", True)], "thresholds": json.dumps({"Fake": 0.5}),
           "model_name": "tiny-fake", "frame": json.dumps({"width": 1280, "height": 720}),
           "meta": json.dumps({"fps": 25.0, "faces_found": 3, "pipeline": []}),
           "units_summary": json.dumps({"ok": 3, "failed": 0, "excluded": {"no face found": 1}}),
           "artifacts": json.dumps([THUMB])}  # fmt: skip
    return row | changes


def face(unit: int, frame_index: int, score: float, x: int = 100) -> dict[str, Any]:
    return {"unit": unit, "kind": "face", "frame_index": frame_index, "time_s": frame_index / 25.0, "status": "ok",
            "x": x - 20, "y": 80, "width": 140, "height": 140, "box_x": x, "box_y": 100, "box_width": 100,
            "box_height": 100, "scores": [("Fake", score)]}  # fmt: skip


UNITS = [
    face(0, 10, 0.2),
    {
        "unit": 1,
        "kind": "frame",
        "frame_index": 30,
        "time_s": 1.2,
        "status": "excluded: no face found",
        "x": 0,
        "y": 0,
        "width": 1280,
        "height": 720,
        "scores": None,
    },  # fmt: skip
    face(2, 50, 0.9),
    face(3, 50, 0.4, x=600),
]


def test_clip_case_shows_the_thumbnail_frame_and_its_faces() -> None:
    case = forensics_case(clip_row(), UNITS, CTX)
    (layer,) = case.layers
    assert layer.source == "/tables/t.parquet.artifacts/ab12-thumbnail.png" and layer.frames == (50,)
    assert layer.frame == {"width": 1280, "height": 720} and case.source == "/in/clips/a.mp4"
    boxes = next(o for o in case.overlays if o.kind == "boxes")
    assert sorted(c["unit"] for c in boxes.cells) == [2, 3]  # frame 50's faces, not frame 10's
    grid = next(o for o in case.overlays if o.kind == "grid")
    assert {c["unit"] for c in grid.cells} == {2, 3}
    assert case.metadata["shown frame"] == {"frame_index": 50, "time_s": 2.0} and "pipeline" not in case.metadata
    assert case.metadata["units"]["left out"] == {"no face found": 1}
    assert [h["unit"] for h in case.highlights] == [2, 3, 0] and case.highlights[0]["frame_index"] == 50
    assert [(f.label, f.score, f.threshold, f.decision) for f in case.findings] == [("Fake", 0.7, 0.5, True)]


def test_timeline_has_one_point_per_sampled_frame() -> None:
    points = frame_timeline(UNITS, "Fake")
    assert [p["frame_index"] for p in points] == [10, 30, 50]
    assert [p["score"] for p in points] == [0.2, None, 0.9]  # a frame's highest face score
    assert points[1]["status"] == "excluded: no face found" and points[1]["faces"] == []
    assert [f["unit"] for f in points[2]["faces"]] == [2, 3] and points[2]["faces"][1]["box"] == [600, 100, 100, 100]
    assert points[0]["time_s"] == 0.4


def test_failed_clip_has_no_findings_and_picture_gets_mask_overlay() -> None:
    failed = forensics_case(clip_row(status="failed: no face found in any of the 8 sampled frames", scores=None,
                                     decisions=None, artifacts=None, units_summary=None), [], CTX)  # fmt: skip
    assert failed.findings == () and failed.timeline == () and failed.layers[0].source == "/in/clips/a.mp4"
    mask = {"kind": "mask", "path": "t.parquet.artifacts/cd-mask.png", "threshold": 0.5,
            "frame": {"space": "file", "width": 300, "height": 300, "scale": 1.0}}  # fmt: skip
    pic = clip_row(path="face.png", artifacts=json.dumps([mask]), frame=json.dumps({"width": 300, "height": 300}))
    unit = {"unit": 0, "kind": "image", "x": 0, "y": 0, "width": 300, "height": 300, "status": "ok",
            "scores": [("Fake", 0.7)]}  # fmt: skip
    case = forensics_case(pic, [unit], CTX)
    assert case.layers[0].source == "/in/face.png" and case.layers[0].kind == "image"
    (m,) = [o for o in case.overlays if o.kind == "mask"]
    assert m.path == "/tables/t.parquet.artifacts/cd-mask.png" and m.threshold == 0.5


def test_domain_is_registered_with_its_reader_and_case() -> None:
    discover_domains()
    info = DOMAINS.get("forensics")
    assert info.review_case is forensics_case and info.unit_table
    assert set(info.input_suffixes) == {".mp4", ".avi", ".mov", ".mkv", ".webm"}
    assert {"faces_found", "frames_with_face", "fps", "duration_s"} <= set(info.meta_keys)
    assert info.read_units.__module__ == "loupe.domains.forensics.units"


@pytest.mark.parametrize("label", [None, "Other"])
def test_timeline_without_a_scored_label_has_no_scores(label: str | None) -> None:
    assert all(p["score"] is None for p in frame_timeline(UNITS, label))
