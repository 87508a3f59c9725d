from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe.core.errors import UnsupportedInputError
from loupe.core.models import WeightSpec
from loupe.core.transforms import ModelInput, match_channels, resize, to_unit_float


def _spec(c: int, size: int = 8, mode: str = "squash") -> WeightSpec:
    return WeightSpec(
        name="s",
        architecture="x",
        input_size=(c, size, size),
        mean=(0.5,) * c,
        std=(0.5,) * c,
        resize_mode=mode,
        interpolation="bilinear",
    )


@pytest.mark.parametrize(
    ("array", "bits", "expected_max"),
    [
        (np.full((4, 4), 255, np.uint8), None, 1.0),
        (np.full((4, 4), 4095, np.uint16), 12, 1.0),
        (np.full((4, 4), 4095, np.uint16), None, 4095 / 65535),
        (np.full((4, 4), 1.7, np.float32), None, 1.0),
    ],
)
def test_unit_scaling_by_bit_depth(array: np.ndarray, bits: int | None, expected_max: float) -> None:
    t = to_unit_float(array, bits)
    assert t.shape == (1, 4, 4)
    torch.testing.assert_close(t.max(), torch.tensor(expected_max))


def test_rgba_drops_alpha_and_grey_to_rgb_repeats() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255
    assert to_unit_float(rgba).shape == (3, 2, 2)
    grey = torch.rand(1, 3, 3)
    torch.testing.assert_close(match_channels(grey, 3)[2], grey[0])
    rgb = torch.stack([torch.ones(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)])
    torch.testing.assert_close(match_channels(rgb, 1), torch.full((1, 2, 2), 0.299))


def test_center_crop_keeps_the_pixels_as_they_are() -> None:
    img = torch.rand(3, 20, 30)
    torch.testing.assert_close(resize(img, (8, 8), "center_crop", "bicubic"), img[:, 6:14, 11:19])  # no resampling
    small = torch.rand(3, 4, 6)  # smaller than the model's input: the shorter side is resized up, then cropped
    assert resize(small, (8, 8), "center_crop", "bilinear").shape == (3, 8, 8)


def test_model_input_normalises_per_spec() -> None:
    out = ModelInput(_spec(1))(np.full((16, 16), 255, np.uint8))
    torch.testing.assert_close(out, torch.ones(1, 8, 8))  # (1 - 0.5) / 0.5
    out3 = ModelInput(_spec(3))(np.zeros((16, 16), np.uint8))
    torch.testing.assert_close(out3, -torch.ones(3, 8, 8))


def test_shorter_side_crop_keeps_aspect() -> None:
    t = torch.zeros(1, 10, 20)
    t[:, :, 5:15] = 1.0  # bright centre band
    out = resize(t, (4, 4), "shorter_side_crop", "nearest")
    assert out.shape == (1, 4, 4) and out.min() == 1.0  # the crop is the centre band
    assert resize(t, (4, 4), "squash", "nearest").min() == 0.0


def test_bad_shape_is_a_loupe_error() -> None:
    with pytest.raises(UnsupportedInputError, match=r"shape \(2, 2, 2, 2\)"):
        to_unit_float(np.zeros((2, 2, 2, 2)))
