"""The CXR training augmentation: one affine warp per batch, per-sample parameters, reproducible, in range."""

from __future__ import annotations

import pytest
import torch

from loupe.domains.cxr.data import BatchAugment

MEAN, STD = (0.5,), (0.25,)


def _ramp(b: int = 4, side: int = 32) -> torch.Tensor:
    """A left-to-right intensity ramp 0..1, normalised like model input  # [B, 1, side, side]."""
    ramp = torch.linspace(0, 1, side).expand(side, side)
    return ((ramp - 0.5) / 0.25).expand(b, 1, side, side).clone()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x * 0.25 + 0.5


def test_no_augmentation_is_the_identity() -> None:
    aug = BatchAugment(MEAN, STD, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))
    x = _ramp()
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)


def test_crops_zoom_in_per_sample_and_are_reproducible() -> None:
    aug = BatchAugment(MEAN, STD, crop_scale=(0.25, 0.25), ratio=(1.0, 1.0))
    x = _ramp(8)
    torch.manual_seed(3)
    out = _unit(aug(x))
    torch.manual_seed(3)
    torch.testing.assert_close(_unit(aug(x)), out)  # same seed, same batch
    span = out[:, 0, 16].amax(-1) - out[:, 0, 16].amin(-1)  # [B] the ramp seen across one row
    torch.testing.assert_close(span, torch.full((8,), 0.5), atol=0.05, rtol=0)  # a half-width crop sees half
    assert len({round(float(v), 3) for v in out[:, 0, 16, 0]}) > 4  # each film got its own crop position


def test_rotation_turns_the_ramp() -> None:
    aug = BatchAugment(MEAN, STD, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=15.0)
    torch.manual_seed(0)
    out = _unit(aug(_ramp(16)))
    column_change = (out[:, 0, -1, :] - out[:, 0, 0, :]).abs().mean(-1)  # a pure left-right ramp has none
    assert (column_change > 0.01).sum() >= 12 and column_change.max() < 0.6


@pytest.mark.parametrize("kind", ["brightness", "contrast"])
def test_intensity_jitter_stays_within_its_factor_and_the_valid_range(kind: str) -> None:
    aug = BatchAugment(MEAN, STD, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), **{kind: 0.4})
    x = _ramp(32)
    torch.manual_seed(1)
    out = _unit(aug(x))
    assert out.min() >= 0.0 and out.max() <= 1.0  # clamped to valid film intensities
    base = _unit(x)
    if kind == "brightness":
        factor = out[:, 0, :, 8].mean(-1) / base[:, 0, :, 8].mean(-1)  # a column the clamp does not reach
        assert factor.min() >= 0.6 - 1e-4 and factor.max() <= 1.4 + 1e-4 and factor.std() > 0.05
    else:
        spread = out.std(dim=(1, 2, 3)) / base.std(dim=(1, 2, 3))
        assert spread.min() >= 0.6 - 1e-3 and spread.std() > 0.05


def test_randaug_magnitude_scales_every_knob() -> None:
    from loupe.core.models import WeightSpec

    spec = WeightSpec(name="t", architecture="x", input_size=(1, 8, 8), mean=MEAN, std=STD)
    full, none = BatchAugment.randaug(spec, 1.0), BatchAugment.randaug(spec, 0.0)
    assert (full.degrees, full.translate, full.brightness, full.contrast) == (15.0, 0.1, 0.4, 0.4)
    assert (none.degrees, none.translate, none.brightness, none.contrast) == (0.0, 0.0, 0.0, 0.0)
    assert BatchAugment.mae(spec).crop_scale == (0.5, 1.0)
