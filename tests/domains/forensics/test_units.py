"""The forensics unit reader: pictures whole or by face, clips by face crops (frames without a face kept as
excluded units) or by whole frames, face alignment (recorded per unit), options checked, metadata
non-identifying."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.core.errors import ConfigError, UnsupportedInputError
from loupe.core.io import safe_meta
from loupe.core.transforms import ModelInput
from loupe.core.units import Unit, UnitFailure
from loupe.domains.forensics.units import META_KEYS, NO_FACE, ForensicsOptions, is_video, read_units

FPS = 10.0


def test_options_parsed_and_checked() -> None:
    cfg = ForensicsOptions.from_options({"frames": 4, "margin": 0.3, "faces": False, "every_s": 2})
    assert (cfg.frames, cfg.margin, cfg.faces, cfg.every_s) == (4, 0.3, False, 2)
    assert cfg.face.margin == 0.3 and cfg.face.min_face == 40
    with pytest.raises(ConfigError, match=r"unknown forensics unit option\(s\) \['frame'\]; known: \['align', "
                       r"'every_s', 'faces', 'frames', 'margin', 'max_faces', 'min_face'\]"):  # fmt: skip
        ForensicsOptions.from_options({"frame": 4})
    with pytest.raises(ConfigError, match=r"faces must be true or false, got 'yes'"):
        ForensicsOptions.from_options({"faces": "yes"})
    with pytest.raises(ConfigError, match=r"align must be true or false, got 1"):
        ForensicsOptions.from_options({"align": 1})
    assert ForensicsOptions().align is False and ForensicsOptions.from_options({"align": True}).align
    with pytest.raises(ConfigError, match=r"frames must be a whole number, got 2.5"):
        ForensicsOptions.from_options({"frames": 2.5})
    with pytest.raises(ConfigError) as err:
        ForensicsOptions.from_options({"frames": 0, "every_s": -1, "margin": 4})
    assert len(err.value.problems) == 3 and "frames must be in [1, 256], got 0" in err.value.problems


def test_a_picture_is_one_whole_image_unit(tmp_path: Path, spec, blank_frames) -> None:
    p = tmp_path / "pic.png"
    Image.fromarray(blank_frames(1)[0]).save(p)
    fu = read_units(p, spec)
    units = list(fu.units)
    assert len(units) == 1 and units[0].info.kind == "image" and units[0].info.region == (0, 0, 320, 240)
    assert units[0].image.shape == (3, 32, 32) and fu.frame == {"width": 320, "height": 240}
    assert fu.meta["units_from"] == "image" and fu.artifacts == []


def test_center_crop_spec_sees_the_central_pixels_unresampled(tmp_path: Path, spec_factory) -> None:
    spec = spec_factory(resize_mode="center_crop")
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    p = tmp_path / "noise.png"
    Image.fromarray(rgb).save(p)
    (unit,) = read_units(p, spec).units
    assert unit.info.region == (16, 8, 32, 32)
    want = (torch.from_numpy(rgb[8:40, 16:48]).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.25
    torch.testing.assert_close(unit.image, want)


def test_faces_false_contradicting_a_face_scope_is_refused(tmp_path: Path, spec_factory) -> None:
    with pytest.raises(ConfigError, match=r"faces=false contradicts model 'tiny-fake', whose scope needs a face"):
        read_units(tmp_path / "x.png", spec_factory(scope={"face_found": True}), {"faces": False})


def test_a_picture_without_a_face_when_faces_are_asked(tmp_path: Path, spec, blank_frames) -> None:
    p = tmp_path / "landscape.png"
    Image.fromarray(blank_frames(1)[0]).save(p)
    with pytest.raises(UnsupportedInputError, match=rf"landscape.png: {NO_FACE} in the picture .*--option faces=false"):
        read_units(p, spec, {"faces": True})


def test_kind_told_by_content_then_extension(tmp_path: Path, blank_frames, clip_writer) -> None:
    png = tmp_path / "really_a_picture.mp4"
    Image.fromarray(blank_frames(1)[0]).save(png, format="PNG")
    clip = clip_writer(tmp_path / "c.mp4", blank_frames(3))
    renamed = tmp_path / "clip_without_extension"
    shutil.copy(clip, renamed)
    (tmp_path / "empty.webm").write_bytes(b"")
    assert not is_video(png) and is_video(clip) and is_video(renamed) and is_video(tmp_path / "empty.webm")


def test_whole_frames_when_faces_false(tmp_path: Path, spec, blank_frames, clip_writer) -> None:
    clip = clip_writer(tmp_path / "c.avi", blank_frames(30), fps=FPS)
    fu = read_units(clip, spec, {"faces": False, "frames": 3})
    units = list(fu.units)
    assert [u.info.frame_index for u in units] == [5, 15, 25]
    assert all(isinstance(u, Unit) and u.info.kind == "frame" and u.info.region == (0, 0, 320, 240) for u in units)
    assert [u.info.time_s for u in units] == [0.5, 1.5, 2.5]
    (thumb,) = fu.artifacts
    assert thumb.kind == "thumbnail" and thumb.data.shape == (240, 320, 3) and thumb.frame["frame_index"] == 15
    assert fu.meta["units_from"] == "frames" and fu.meta["frames_sampled"] == 3


def test_a_clip_without_any_face_is_a_clear_file_failure(tmp_path: Path, spec, blank_frames, clip_writer) -> None:
    clip = clip_writer(tmp_path / "scenery.mp4", blank_frames(20), fps=FPS)
    with pytest.raises(UnsupportedInputError, match=rf"scenery.mp4: {NO_FACE} in any of the 4 sampled frames .*"
                       r"--option faces=false"):  # fmt: skip
        read_units(clip, spec, {"frames": 4})


@pytest.fixture(scope="module")
def mixed_clip(tmp_path_factory: pytest.TempPathFactory, face_rgb: np.ndarray, clip_writer) -> Path:
    """40 frames of 480 x 360 at 10 fps: the face (300 px) in frames 0-9 and 20-29, none in 10-19 and 30-39."""
    base = np.full((360, 480, 3), 60, np.uint8)
    frames = []
    for i in range(40):
        f = base.copy()
        if (i // 10) % 2 == 0:
            f[30:330, 150:450] = face_rgb
        frames.append(f)
    return clip_writer(tmp_path_factory.mktemp("mixed") / "mixed.avi", frames, fps=FPS)


@pytest.mark.realdata
def test_faces_in_a_clip_with_frames_without_one(mixed_clip: Path, spec) -> None:
    fu = read_units(mixed_clip, spec, {"frames": 4, "margin": 0.1})  # samples frames 5, 15, 25, 35
    units = list(fu.units)
    assert [u.info.frame_index for u in units] == [5, 15, 25, 35]  # one face per face frame; no frame dropped
    faces = [u for u in units if isinstance(u, Unit)]
    excluded = [u for u in units if isinstance(u, UnitFailure)]
    assert [u.info.frame_index for u in faces] == [5, 25] and [u.info.index for u in units] == [0, 1, 2, 3]
    assert all(u.status == "excluded" and u.reason == NO_FACE and u.info.kind == "frame" for u in excluded)
    for u in faces:
        x, y, w, h = u.info.region
        bx, by, bw, bh = u.info.box
        assert u.info.kind == "face" and u.info.time_s == u.info.frame_index / FPS and w == h
        assert x <= bx and y <= by and bx + bw <= x + w and by + bh <= y + h  # the crop holds the face
        assert 150 <= bx + bw / 2 <= 450 and 0 <= x and x + w <= 480 and y + h <= 360
        assert u.info.meta["face_score"] > 0 and u.image.shape == (3, 32, 32)
    counts = {k: fu.meta[k] for k in ("frames_sampled", "frames_decoded", "frames_with_face", "faces_found")}
    assert counts == {"frames_sampled": 4, "frames_decoded": 4, "frames_with_face": 2, "faces_found": 2}
    (thumb,) = fu.artifacts
    assert thumb.frame["frame_index"] in (5, 25) and thumb.frame["scale"] == 1.0


@pytest.mark.realdata
def test_face_crop_is_preprocessed_from_the_frame_pixels(mixed_clip: Path, spec) -> None:
    """A face unit's tensor is exactly the spec's preprocessing of its crop of the decoded frame."""
    from loupe.domains.forensics.video import read_frames

    first = next(u for u in read_units(mixed_clip, spec, {"frames": 4}).units if isinstance(u, Unit))
    ((_, frame),) = read_frames(mixed_clip, [first.info.frame_index])
    x, y, w, h = first.info.region
    torch.testing.assert_close(first.image, ModelInput(spec)(frame[y : y + h, x : x + w]))


@pytest.mark.realdata
def test_a_face_picture_by_face_and_by_scope(face_file: Path, spec, spec_factory) -> None:
    (whole,) = read_units(face_file, spec).units
    assert whole.info.kind == "image"
    fu = read_units(face_file, spec_factory(scope={"face_found": True}))  # a face model crops faces by default
    (face,) = fu.units
    assert face.info.kind == "face" and face.info.box is not None and face.info.frame_index is None
    assert fu.meta["face_found"] is True and fu.meta["faces_found"] == 1
    stored = safe_meta(fu.meta, META_KEYS)
    assert "path" not in stored and stored["faces_found"] == 1 and stored["source_format"] == "jpeg"


def test_every_s_samples_by_time(tmp_path: Path, spec, blank_frames, clip_writer) -> None:
    clip = clip_writer(tmp_path / "c.avi", blank_frames(30), fps=FPS)
    fu = read_units(clip, spec, {"faces": False, "every_s": 1.0})
    assert [(u.info.frame_index, u.info.time_s) for u in fu.units] == [(0, 0.0), (10, 1.0), (20, 2.0)]
    assert fu.meta["every_s"] == 1.0 and fu.meta["frames_sampled"] == 3


@pytest.mark.realdata
def test_a_frame_that_does_not_decode_is_a_failed_unit(mixed_clip: Path, spec, monkeypatch) -> None:
    """A sampled frame the decoder rejects is a failed unit with its reason; the clip's other frames go on."""
    from loupe.domains.forensics import units as mod

    real = mod.read_frames

    def flaky(path, indices, **kw):
        for fi, frame in real(path, indices, **kw):
            yield fi, ("frame could not be decoded (planted)" if fi == 25 else frame)

    monkeypatch.setattr(mod, "read_frames", flaky)
    fu = read_units(mixed_clip, spec, {"frames": 4})
    units = list(fu.units)
    assert [(u.info.frame_index, getattr(u, "status", "ok")) for u in units] == [
        (5, "ok"), (15, "excluded"), (25, "failed"), (35, "excluded")]  # fmt: skip
    assert units[2].reason == "frame could not be decoded (planted)" and fu.meta["frames_decoded"] == 3
    monkeypatch.setattr(mod, "read_frames", lambda path, indices, **kw: ((i, "damaged packet") for i in indices))
    with pytest.raises(UnsupportedInputError, match=r"mixed.avi: none of the 4 sampled frames decodes \(damaged"):
        read_units(mixed_clip, spec, {"frames": 4})


# ---------------------------------------------------------------------------------------------------- alignment
def _rotated(a: np.ndarray, degrees: float, size: tuple[int, int]) -> np.ndarray:
    """``a`` rotated counter-clockwise by ``degrees`` and placed in the middle of a grey ``size`` (H, W) frame."""
    import cv2

    h, w = a.shape[:2]
    turned = cv2.warpAffine(a, cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), degrees, 1.0), (w, h),
                            flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)  # fmt: skip
    frame = np.full((*size, 3), 60, np.uint8)
    y, x = (size[0] - h) // 2, (size[1] - w) // 2
    frame[y : y + h, x : x + w] = turned
    return frame


@pytest.mark.realdata
def test_align_off_by_default_records_nothing(face_file: Path, spec) -> None:
    fu = read_units(face_file, spec, {"faces": True})
    (face,) = fu.units
    assert {"align", "faces_with_eyes"}.isdisjoint(fu.meta)
    assert {"eyes_found", "eye_angle_deg", "rotation_deg"}.isdisjoint(face.info.meta)


@pytest.mark.realdata
def test_aligned_face_picture_is_the_rotated_crop_and_says_so(face_file: Path, face_rgb: np.ndarray, spec) -> None:
    from loupe.domains.forensics.faces import rotated_crop

    fu = read_units(face_file, spec, {"faces": True, "align": True})
    (face,) = fu.units
    m = face.info.meta
    assert fu.meta["align"] is True and fu.meta["faces_with_eyes"] == 1
    assert m["eyes_found"] is True and m["eye_angle_deg"] == pytest.approx(2.7, abs=0.5)  # real_1's own tilt
    assert m["rotation_deg"] == m["eye_angle_deg"] and face.info.region == tuple(m["crop"])  # same square
    torch.testing.assert_close(face.image, ModelInput(spec)(rotated_crop(face_rgb, tuple(m["crop"]),
                                                                         m["rotation_deg"])))  # fmt: skip
    plain = next(iter(read_units(face_file, spec, {"faces": True}).units))
    assert not torch.equal(face.image, plain.image)
    assert safe_meta(fu.meta, META_KEYS)["faces_with_eyes"] == 1


@pytest.mark.realdata
def test_eyes_not_found_leaves_the_crop_unaligned_and_recorded(tmp_path: Path, face_rgb: np.ndarray, spec) -> None:
    from loupe.domains.forensics.faces import detect_faces, find_eyes

    (found,) = detect_faces(face_rgb)
    eyes = find_eyes(face_rgb, found.box)
    covered = face_rgb.copy()
    for x, y in (eyes.left, eyes.right):
        covered[int(y) - 18 : int(y) + 18, int(x) - 28 : int(x) + 28] = 20  # dark glasses: the face stays findable
    p = tmp_path / "glasses.png"
    Image.fromarray(covered).save(p)
    fu = read_units(p, spec, {"faces": True, "align": True})
    (face,) = fu.units
    assert fu.meta["faces_with_eyes"] == 0
    assert face.info.meta | {"crop": None} == {"face_score": face.info.meta["face_score"], "face_rank": 0,
                                               "crop": None, "eyes_found": False, "rotation_deg": 0.0,
                                               "eye_angle_deg": None}  # fmt: skip
    x, y, w, h = face.info.meta["crop"]
    torch.testing.assert_close(face.image, ModelInput(spec)(covered[y : y + h, x : x + w]))


@pytest.mark.realdata
def test_a_tilted_face_in_a_clip_is_levelled(tmp_path: Path, face_rgb: np.ndarray, spec, clip_writer) -> None:
    """The face turned 10 degrees counter-clockwise in every frame: each face unit measures the eyes' tilt as the
    face's own (+2.7) minus 10 and is rotated back by it."""
    frames = [_rotated(face_rgb, 10.0, (360, 480))] * 10
    clip = clip_writer(tmp_path / "tilted.avi", frames, fps=FPS)
    fu = read_units(clip, spec, {"frames": 3, "align": True})
    faces = [u for u in fu.units if isinstance(u, Unit)]
    assert len(faces) == 3 and fu.meta["faces_with_eyes"] == 3
    for u in faces:
        assert u.info.meta["eyes_found"] and u.info.meta["rotation_deg"] == pytest.approx(2.7 - 10.0, abs=2.0)
