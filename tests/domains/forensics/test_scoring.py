"""``loupe score forensics`` over real FaceForensics++ clips, a face picture and the clips users also send (one with
no face, a truncated one, an empty one): one row per file, one unit row per face or faceless frame, clear failures,
and the review case of a clip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import loupe.domains.forensics  # noqa: F401 - registers the domain
from loupe.core.models import build_model, save_model
from loupe.workflows.scoring import ScoreOptions, score, units_path

pytestmark = pytest.mark.realdata
FRAMES = 6
REAL = ("004.mp4", "519.mp4", "634.mp4")


@pytest.fixture(scope="module")
def folder(ffpp_real, face_file, blank_frames, clip_writer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for clip in ffpp_real:
        shutil.copy(clip, root / clip.name)
    clip_writer(root / "no_face.mp4", blank_frames(50), fps=25.0)
    data = ffpp_real[0].read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) * 3 // 5])
    (root / "empty.mp4").write_bytes(b"")
    shutil.copy(face_file, root / "face.jpg")
    (root / "labels.csv").write_text("path,label\n004.mp4,0\n")  # not an input: skipped
    return root


@pytest.fixture(scope="module")
def model_dir(spec_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = spec_factory(unit_options={"frames": FRAMES}, aggregation="mean")
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return save_model(model.eval(), spec, tmp_path_factory.mktemp("m") / "fake")


@pytest.fixture(scope="module")
def scored(folder: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "preds.parquet"
    summary = score(ScoreOptions(domain="forensics", input=folder, model=f"local-dir:{model_dir}", out=out,
                                 track=False, num_workers=0, batch_size=16))  # fmt: skip
    assert (summary.inputs, summary.not_images, summary.rows_ok, summary.rows_failed) == (7, 1, 4, 3)
    assert summary.exit_code == 1
    return out


def test_one_row_per_file_and_clear_failures(scored: Path) -> None:
    f = pd.read_parquet(scored).set_index("path")
    assert sorted(f.index) == sorted([*REAL, "empty.mp4", "face.jpg", "no_face.mp4", "truncated.mp4"])
    assert (f.loc[[*REAL, "face.jpg"], "status"] == "ok").all()
    assert (
        f.loc["empty.mp4", "status"] == "failed: the video file is empty (0 bytes); re-export or re-download the clip"
    )
    assert f.loc["truncated.mp4", "status"].startswith("failed: OpenCV (FFmpeg) cannot open this mp4 video: it is "
                                                       "truncated or damaged")  # fmt: skip
    assert f.loc["no_face.mp4", "status"].startswith(f"failed: no face found in any of the {FRAMES} sampled frames")
    assert "--option faces=false" in f.loc["no_face.mp4", "status"]
    assert f.status.str.contains("/").sum() == 0  # no folder above the input in any reason


def test_faces_found_in_every_sampled_frame_of_the_real_clips(scored: Path) -> None:
    f = pd.read_parquet(scored).set_index("path")
    for name in REAL:
        meta = json.loads(f.loc[name, "meta"])
        assert meta["frames_sampled"] == FRAMES and meta["frames_decoded"] == FRAMES
        assert meta["frames_with_face"] == FRAMES, (name, meta)  # measured: 6 of 6 in each of 004, 519, 634
        assert FRAMES <= meta["faces_found"] <= 2 * FRAMES  # the odd second box (a background face or a doubt)
        assert meta["face_found"] is True and meta["units_from"] == "faces" and meta["fps"] == 25.0
        assert {"path", "title", "creation_time"}.isdisjoint(meta)
        assert f.loc[name, "n_units"] == meta["faces_found"] and f.loc[name, "n_units_failed"] == 0
    assert json.loads(f.loc["004.mp4", "frame"]) == {"width": 1280, "height": 720}


def test_unit_rows_per_face_with_time_box_and_crop(scored: Path) -> None:
    f = pd.read_parquet(scored).set_index("path")
    u = pd.read_parquet(units_path(scored))
    assert set(u.path) == {*REAL, "face.jpg"}  # failed files have no unit rows
    assert u.groupby("path").size().to_dict() == f.loc[sorted(set(u.path)), "n_units"].to_dict()
    faces = u[u.path.isin(REAL)]
    assert (faces.kind == "face").all() and (faces.status == "ok").all()
    torch.testing.assert_close(torch.tensor(faces.time_s.to_numpy()), torch.tensor(faces.frame_index / 25.0),
                               check_dtype=False)  # fmt: skip
    assert (faces.width == faces.height).all() and (faces.box_x >= faces.x).all() and (faces.box_y >= faces.y).all()
    assert ((faces.box_x + faces.box_width) <= (faces.x + faces.width)).all()
    for name in REAL:  # the clip's score is the mean of its face scores (the spec's aggregation)
        mine = faces[faces.path == name]
        assert f.loc[name, "score_Fake"] == pytest.approx(mine.score_Fake.mean())
        assert mine.frame_index.nunique() == FRAMES
    pic = u[u.path == "face.jpg"]
    assert pic.kind.tolist() == ["image"] and pic[["x", "y", "width", "height"]].values.tolist() == [[0, 0, 300, 300]]


def test_review_case_of_a_clip(scored: Path) -> None:
    from PIL import Image

    from loupe.workflows.review import review_cases

    cases = {c.path: c for c in review_cases(scored)}
    case = cases["004.mp4"]
    (layer,) = case.layers
    assert layer.kind == "image" and layer.source.endswith("-thumbnail.png") and layer.frames
    with Image.open(layer.source) as thumb:
        assert thumb.size == (1024, 576)  # 1280 x 720 frame at most 1024 px wide
    assert case.source.endswith("004.mp4") and layer.frame == {"width": 1280, "height": 720}
    assert [p["frame_index"] for p in case.timeline] == sorted(p["frame_index"] for p in case.timeline)
    assert len(case.timeline) == FRAMES and all(p["score"] is not None and p["faces"] for p in case.timeline)
    boxes = next(o for o in case.overlays if o.kind == "boxes")
    shown = next(p for p in case.timeline if p["frame_index"] == layer.frames[0])
    assert len(boxes.cells) == len(shown["faces"])  # the faces of the frame on screen only
    assert [fd.label for fd in case.findings] == ["Fake"] and case.findings[0].threshold == 0.5
    assert case.highlights[0]["score"] == max(p["score"] for p in case.timeline)
    assert cases["no_face.mp4"].status.startswith("failed") and not cases["no_face.mp4"].findings
    assert cases["face.jpg"].layers[0].source.endswith("face.jpg") and not cases["face.jpg"].timeline
