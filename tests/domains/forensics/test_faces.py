"""Face detection (the bundled Haar cascade) and the square crops the model sees."""

from __future__ import annotations

import numpy as np
import pytest

from loupe.core.errors import ConfigError
from loupe.domains.forensics.faces import FaceConfig, crop, detect_faces, square_crop, to_gray8


@pytest.mark.parametrize(
    ("box", "frame", "margin", "expected"),
    [
        ((100, 100, 50, 50), (400, 300), 0.2, (90, 90, 70, 70)),  # 1.4 x the face, centred on it
        ((100, 100, 50, 40), (400, 300), 0.0, (100, 95, 50, 50)),  # square on the longer side
        ((0, 0, 50, 50), (400, 300), 0.5, (0, 0, 100, 100)),  # at the corner: moved inside, still square
        ((360, 260, 40, 40), (400, 300), 0.5, (320, 220, 80, 80)),
        ((10, 10, 200, 200), (400, 250), 0.5, (0, 0, 250, 250)),  # larger than the frame: cut to its shorter side
    ],
)
def test_square_crop_is_square_inside_the_frame(box, frame, margin, expected) -> None:
    x, y, w, h = square_crop(box, *frame, margin)
    assert (x, y, w, h) == expected
    assert w == h and x >= 0 and y >= 0 and x + w <= frame[0] and y + h <= frame[1]


def test_crop_is_the_region_of_the_image() -> None:
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    np.testing.assert_array_equal(crop(img, (5, 2, 10, 8)), img[2:10, 5:15])


def test_gray8_scales_by_bit_depth_and_uses_luma() -> None:
    assert to_gray8(np.full((4, 4), 4095, np.uint16), bit_depth=12).max() == 255
    assert to_gray8(np.full((4, 4), 2048, np.uint16), bit_depth=12)[0, 0] == 128
    assert to_gray8(np.full((4, 4), 0.5, np.float32))[0, 0] == 128
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 1] = 200
    assert to_gray8(rgba)[0, 0] == round(0.587 * 200)  # alpha dropped, green weighted by ITU-R 601 luma


def test_no_face_in_noise_and_bad_config_refused(blank_frames) -> None:
    assert detect_faces(blank_frames(1)[0]) == []
    with pytest.raises(ConfigError, match=r"margin must be in \[0, 2\].*got 3"):
        detect_faces(blank_frames(1)[0], FaceConfig(margin=3.0))
    assert "max_faces must be >= 0" in FaceConfig(max_faces=-1).problems()[0]


@pytest.mark.realdata
def test_a_real_face_is_found_with_a_score(face_rgb: np.ndarray) -> None:
    faces = detect_faces(face_rgb)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    assert 200 <= w <= 300 and w == h and abs(x + w / 2 - 150) < 20 and abs(y + h / 2 - 150) < 25
    assert faces[0].score > 3.0  # the cascade's level weight: a clear frontal face scores well above doubtful boxes
    assert detect_faces(face_rgb, FaceConfig(min_face=301)) == []  # smaller than min_face: not reported


@pytest.mark.realdata
def test_faces_sorted_by_size_max_faces_and_boxes_in_image_pixels(face_rgb: np.ndarray) -> None:
    """Two faces (300 and 150 px) on a 1600 px canvas: detection runs at 640 px, boxes come back in canvas pixels."""
    from PIL import Image

    canvas = np.full((900, 1600, 3), 40, np.uint8)
    canvas[100:400, 1100:1400] = face_rgb
    canvas[500:650, 200:350] = np.asarray(Image.fromarray(face_rgb).resize((150, 150), Image.Resampling.LANCZOS))
    faces = detect_faces(canvas)
    assert len(faces) == 2
    big, small = faces[0].box, faces[1].box
    assert faces[0].area > faces[1].area
    assert 1100 <= big[0] + big[2] / 2 <= 1400 and 100 <= big[1] + big[3] / 2 <= 400
    assert 200 <= small[0] + small[2] / 2 <= 350 and 500 <= small[1] + small[3] / 2 <= 650
    assert [f.box for f in detect_faces(canvas, FaceConfig(max_faces=1))] == [big]
    assert [f.box for f in detect_faces(canvas, FaceConfig(min_face=200))] == [big]
