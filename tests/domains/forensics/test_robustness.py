"""Degradations really degrade (JPEG changes pixels and more so at low quality, blur and downscale-upscale remove
high-frequency energy, noise has the asked spread), the training augmentation, and the robustness sweep: every
(condition, level) row, clean levels scored once, and an artifact-reading scorer losing its edge as the trace is
blurred or compressed away; the table and plot logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.tracking import NullRun
from loupe.domains.forensics import robustness as rb
from loupe.domains.forensics.models import forensics_spec

SIDE = 48


def photo(seed: int = 0) -> np.ndarray:
    """A smooth colour field with mild noise (uint8 [48, 48, 3])."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(40, 215, (6, 6, 3), dtype=np.uint8))
    base = np.asarray(small.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def checker(a: np.ndarray, amplitude: float = 20.0) -> np.ndarray:
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    return np.clip(a + amplitude * (2 * ((yy + xx) % 2)[..., None] - 1.0), 0, 255).astype(np.uint8)


def hf_energy(a: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian: the high-frequency energy a trace lives in."""
    x = a.astype(np.float64)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.abs(lap).mean())


# -------------------------------------------------------------------------------------------- the degradations
def test_jpeg_changes_pixels_more_at_lower_quality() -> None:
    a = checker(photo())
    err = {q: np.abs(rb.jpeg(a, q).astype(int) - a).mean() for q in (100, 90, 50, 30)}
    assert err[30] > 2.0 and err[30] > err[50] > err[90] > err[100]
    assert rb.jpeg(a, 30).shape == a.shape and rb.jpeg(a, 30).dtype == np.uint8
    with pytest.raises(ConfigError, match="JPEG quality must be in 1..100, got 0"):
        rb.jpeg(a, 0)


def test_blur_removes_high_frequency_energy_in_order_of_sigma() -> None:
    a = checker(photo())
    energy = [hf_energy(rb.blur(a, s)) for s in (0, 1, 2, 3)]
    assert energy[0] == hf_energy(a) and energy[0] > 4 * energy[1] and energy[1] > energy[2] > energy[3]
    np.testing.assert_array_equal(rb.blur(a, 0), a)


def test_downscale_shrinks_and_downscale_upscale_loses_detail() -> None:
    a = checker(photo())
    assert rb.downscale(a, 0.5).shape == (24, 24, 3) and rb.downscale(a, 0.75).shape == (36, 36, 3)
    restored = rb.downscale(a, 0.5, restore=True)
    assert restored.shape == a.shape and hf_energy(restored) < 0.5 * hf_energy(a)
    np.testing.assert_array_equal(rb.downscale(a, 1), a)
    with pytest.raises(ConfigError, match=r"downscale factor must be in \(0, 1\], got 1.5"):
        rb.downscale(a, 1.5)


def test_noise_has_the_asked_spread_and_is_seeded() -> None:
    a = np.full((64, 64, 3), 128, np.uint8)
    noisy = rb.gaussian_noise(a, 0.05, seed=3)
    assert abs((noisy.astype(float) - a).std() / 255 - 0.05) < 0.005
    np.testing.assert_array_equal(noisy, rb.gaussian_noise(a, 0.05, seed=3))
    assert not np.array_equal(noisy, rb.gaussian_noise(a, 0.05, seed=4))
    np.testing.assert_array_equal(rb.gaussian_noise(a, 0, seed=3), a)
    with pytest.raises(ConfigError, match="degradation 'rain' is unknown"):
        rb.degrade(a, "rain", 1)


def test_as_rgb8_takes_grey_sixteen_bit_and_alpha() -> None:
    grey16 = np.full((4, 5), 65535, np.uint16)
    assert rb.as_rgb8(grey16).shape == (4, 5, 3) and rb.as_rgb8(grey16).max() == 255
    assert rb.as_rgb8(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)


def test_train_augment_crops_flips_and_degrades_as_configured() -> None:
    a = checker(photo())
    off = rb.TrainAugment(rb.AugmentConfig(enabled=False), crop=32)
    np.testing.assert_array_equal(off(a), a)
    crop_only = rb.TrainAugment(rb.AugmentConfig(flip=0, downscale_p=0, blur_p=0, jpeg_p=0), crop=32)
    out = crop_only(a)
    assert out.shape == (32, 32, 3)
    assert any(np.array_equal(out, a[y : y + 32, x : x + 32]) for y in range(17) for x in range(17))  # native pixels
    flip = rb.TrainAugment(rb.AugmentConfig(flip=1, random_crop=False, downscale_p=0, blur_p=0, jpeg_p=0))
    np.testing.assert_array_equal(flip(a), a[:, ::-1])
    heavy = rb.TrainAugment(rb.AugmentConfig(flip=0, random_crop=False, blur_p=1, blur_sigma=(2, 3), jpeg_p=1))
    assert hf_energy(heavy(a)) < 0.3 * hf_energy(a)
    torch.manual_seed(5)
    first = rb.TrainAugment(rb.AugmentConfig(), crop=32)(a)
    torch.manual_seed(5)
    np.testing.assert_array_equal(rb.TrainAugment(rb.AugmentConfig(), crop=32)(a), first)  # seeded by torch


# ------------------------------------------------------------------------------------------------------ the sweep
class TraceScorer(nn.Module):
    """Scores an image by its high-frequency energy (what a checkerboard trace adds): an artifact reader."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lap = torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        energy = nn.functional.conv2d(x, lap, groups=3).abs().mean((1, 2, 3))
        return (energy - 1.0)[:, None] * 4  # [B, 1] logits


@pytest.fixture(scope="module")
def test_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("sweep")
    rows = []
    for i in range(24):
        a = photo(100 + i)
        fake = i % 2 == 1
        Image.fromarray(checker(a, amplitude=6.0) if fake else a).save(root / f"{i:02d}.png")
        rows.append({"path": f"{i:02d}.png", "Fake": float(fake)})
    return pd.DataFrame(rows), root


def test_sweep_has_every_row_and_the_trace_reader_degrades(test_rows, tmp_path: Path) -> None:
    rows, root = test_rows
    spec = forensics_spec("trace", "forensics_vit_micro_patch8", img_size=32)
    table = rb.robustness_sweep(TraceScorer(), spec, rows, root, torch.device("cpu"), threshold=0.5, n_boot=50)
    expected = [(c, float(v)) for c, levels in rb.SWEEP.items() for v in levels]
    assert list(zip(table["condition"], table["level"], strict=True)) == expected
    assert set(table.columns) >= {"auroc", "ci_low", "ci_high", "ap", "accuracy", "accuracy_05", "eer", "n"}
    by = table.set_index(["condition", "level"])["auroc"]
    clean = by[("blur", 0.0)]
    assert clean == 1.0 and by[("downscale", 1.0)] == clean and by[("noise", 0.0)] == clean
    assert by[("blur", 3.0)] < 0.8 and by[("jpeg", 30.0)] < 0.8 <= by[("jpeg", 100.0)]  # the trace is lost
    assert (table["n"] == 24).all() and (table["ci_low"] <= table["auroc"]).all()
    run = NullRun()
    metrics = rb.log_sweep(run, table, tmp_path / "robustness")
    assert (tmp_path / "robustness" / "robustness.png").stat().st_size > 5000
    assert pd.read_csv(tmp_path / "robustness" / "robustness.csv").shape[0] == len(expected)
    assert metrics["robust_blur_3_auroc"] == pytest.approx(by[("blur", 3.0)])
    assert metrics["robust_downscale_0p5_auroc"] == pytest.approx(by[("downscale", 0.5)])


def test_sweep_refuses_unknown_conditions(test_rows) -> None:
    rows, root = test_rows
    spec = forensics_spec("trace", "forensics_vit_micro_patch8", img_size=32)
    with pytest.raises(ConfigError, match=r"robustness conditions \['fog'\] are unknown"):
        rb.robustness_sweep(TraceScorer(), spec, rows, root, "cpu", threshold=0.5, conditions={"fog": (1,)})


@pytest.mark.realdata
def test_degradations_on_real_faces(shared_data: Path) -> None:
    root = shared_data / "faces" / "real_vs_stylegan2" / "images"
    for path in (root / "real" / "real_1.jpg", root / "fake" / "fake_1.jpg"):
        a = np.asarray(Image.open(path).convert("RGB"))
        assert a.shape == (300, 300, 3)
        assert np.abs(rb.jpeg(a, 30).astype(int) - a).mean() > np.abs(rb.jpeg(a, 90).astype(int) - a).mean() > 0
        assert hf_energy(rb.blur(a, 2)) < 0.5 * hf_energy(a)
        assert rb.downscale(a, 0.5).shape == (150, 150, 3)
