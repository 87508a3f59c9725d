"""Image degradations for forensic detectors: the training augmentation and the robustness sweep.

A detector that reads generation traces loses them to what images go through when shared: JPEG re-compression,
blur, downscaling, sensor-like noise. The same pure functions (uint8 ``[H, W, 3]`` in, uint8 out, applied to the
decoded image *before* preprocessing) serve both sides:

- `TrainAugment`: random flips and crops, and with set probabilities a downscale-upscale, a Gaussian blur and a JPEG
  re-compression (PIL, random quality) - the blur + JPEG recipe of Wang et al. 2020 ("CNN-generated images are
  surprisingly easy to spot... for now"), which is what makes detectors survive the sweep below.
- `robustness_sweep`: a trained model scored on the test split under each `SWEEP` condition and level; a table
  (condition, level, n, AUROC [95 % CI], AP, accuracy at 0.5 and at the stored threshold, EER) and a plot.
  Downscaling there keeps the smaller image (as a re-shared picture is), so the centre crop then covers more of it.
- `detection_metrics`: the figures of one scored set (also what ``forensics.detect`` reports).
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter

from loupe.core.errors import ConfigError

log = logging.getLogger(__name__)

#: condition → levels; the first level of blur, downscale and noise is the clean image.
SWEEP: dict[str, tuple[float, ...]] = {
    "jpeg": (100, 90, 70, 50, 30),
    "blur": (0, 1, 2, 3),
    "downscale": (1, 0.75, 0.5),
    "noise": (0, 0.02, 0.05),
}
_IDENTITY = {"blur": 0, "downscale": 1, "noise": 0}


# ------------------------------------------------------------------------------------------------- degradations
def as_rgb8(a: np.ndarray) -> np.ndarray:
    """A decoded image as uint8 ``[H, W, 3]``: grey repeated, alpha dropped, 16-bit and float scaled."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] in (2, 4):
        a = a[:, :, :-1]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return (a.astype(np.float64) / np.iinfo(a.dtype).max * 255 + 0.5).astype(np.uint8)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    """Re-compress as a baseline JPEG at ``quality`` (1..100, PIL, 4:2:0 chroma as PIL's default) and decode."""
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(as_rgb8(a)).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (0 = unchanged)."""
    if sigma <= 0:
        return as_rgb8(a)
    return np.asarray(Image.fromarray(as_rgb8(a)).filter(ImageFilter.GaussianBlur(radius=float(sigma))))


def downscale(a: np.ndarray, factor: float, restore: bool = False) -> np.ndarray:
    """Resize by ``factor`` (0 < factor <= 1, bicubic with antialiasing); ``restore`` resizes back to the original
    size (downscale-upscale: the detail is lost, the geometry kept)."""
    if not 0 < factor <= 1:
        raise ConfigError(f"downscale factor must be in (0, 1], got {factor}")
    img = Image.fromarray(as_rgb8(a))
    if factor == 1:
        return np.asarray(img)
    w, h = img.size
    small = img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC) if restore else small)


def gaussian_noise(a: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of standard deviation ``sigma`` on the 0..1 intensity scale, clipped, re-quantised."""
    a = as_rgb8(a)
    if sigma <= 0:
        return a
    rng = np.random.default_rng(seed)
    noisy = a.astype(np.float32) / 255.0 + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8)


def degrade(a: np.ndarray, condition: str, level: float, seed: int = 0) -> np.ndarray:
    """One `SWEEP` condition at one level (``seed`` draws the noise)."""
    if condition == "jpeg":
        return jpeg(a, int(level))
    if condition == "blur":
        return blur(a, float(level))
    if condition == "downscale":
        return downscale(a, float(level))
    if condition == "noise":
        return gaussian_noise(a, float(level), seed)
    raise ConfigError(f"degradation {condition!r} is unknown; use one of {list(SWEEP)}")


# ------------------------------------------------------------------------------------------- training augmentation
@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (probabilities per sample): ``flip`` horizontal; ``random_crop`` a random position for
    the input-sized crop instead of the centre (centre-crop models only); ``downscale_p`` a downscale-upscale by a
    factor in ``downscale``; ``blur_p`` a Gaussian blur with sigma in ``blur_sigma``; ``jpeg_p`` a JPEG
    re-compression at a quality in ``jpeg_quality``."""

    enabled: bool = True
    flip: float = 0.5
    random_crop: bool = True
    downscale_p: float = 0.1
    downscale: tuple[float, float] = (0.5, 1.0)
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 3.0)
    jpeg_p: float = 0.1
    jpeg_quality: tuple[int, int] = (30, 100)

    def problems(self) -> list[str]:
        out = [f"{k} must be a probability in [0, 1], got {v}" for k, v in
               (("flip", self.flip), ("downscale_p", self.downscale_p), ("blur_p", self.blur_p),
                ("jpeg_p", self.jpeg_p)) if not 0.0 <= v <= 1.0]  # fmt: skip
        if not 0 < self.downscale[0] <= self.downscale[1] <= 1:
            out.append(f"downscale must be a range within (0, 1], got {list(self.downscale)}")
        if not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            out.append(f"blur_sigma must be a range of sigmas >= 0, got {list(self.blur_sigma)}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            out.append(f"jpeg_quality must be a range within 1..100, got {list(self.jpeg_quality)}")
        return out


def _u() -> float:
    # torch's generator: seeded by the recipe, and per worker by the DataLoader, so workers never repeat each other
    return float(torch.rand(()))


@dataclass(frozen=True)
class TrainAugment:
    """uint8 ``[H, W, 3]`` → augmented uint8 image; ``crop``: the model's input side for a random crop (None: no
    crop, the model's preprocessing decides)."""

    cfg: AugmentConfig
    crop: int | None = None

    def __call__(self, a: np.ndarray) -> np.ndarray:
        c = self.cfg
        a = as_rgb8(a)
        if not c.enabled:
            return a
        if _u() < c.downscale_p:
            a = downscale(a, c.downscale[0] + _u() * (c.downscale[1] - c.downscale[0]), restore=True)
        if _u() < c.blur_p:
            a = blur(a, c.blur_sigma[0] + _u() * (c.blur_sigma[1] - c.blur_sigma[0]))
        if _u() < c.jpeg_p:
            a = jpeg(a, int(round(c.jpeg_quality[0] + _u() * (c.jpeg_quality[1] - c.jpeg_quality[0]))))
        if c.random_crop and self.crop and min(a.shape[:2]) > self.crop:
            y = int(_u() * (a.shape[0] - self.crop + 1))
            x = int(_u() * (a.shape[1] - self.crop + 1))
            a = a[y : y + self.crop, x : x + self.crop]
        if _u() < c.flip:
            a = a[:, ::-1]
        return np.ascontiguousarray(a)


# ------------------------------------------------------------------------------------------------------ metrics
def detection_metrics(y: np.ndarray, s: np.ndarray, threshold: float, *, n_boot: int = 1000, alpha: float = 0.05,
                      groups: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Real (0) / fake (1) labels ``y`` ``[N]`` and fake scores ``s`` ``[N]``: AUROC with its percentile bootstrap
    CI (by ``groups`` when given), AP, accuracy at 0.5 and at ``threshold``, EER and the score nearest it."""
    from loupe.core.metrics import average_precision, eer, per_label_auroc_ci

    y, s = np.asarray(y, dtype=np.float64).reshape(-1), np.asarray(s, dtype=np.float64).reshape(-1)
    table = per_label_auroc_ci(y[:, None], s[:, None], ["Fake"], n_boot=n_boot, alpha=alpha, seed=seed,
                               groups=groups, macro=False).iloc[0]  # fmt: skip
    rate, at = eer(y, s)
    return {"n": float(len(y)), "n_fake": float(y.sum()), "auroc": float(table["auroc"]),
            "ci_low": float(table["ci_low"]), "ci_high": float(table["ci_high"]), "ap": average_precision(y, s),
            "accuracy_05": float(((s >= 0.5) == (y == 1)).mean()),
            "accuracy": float(((s >= threshold) == (y == 1)).mean()), "eer": rate, "eer_threshold": at}  # fmt: skip


# --------------------------------------------------------------------------------------------------------- sweep
def _score(model, spec, rows: pd.DataFrame, root: Path, device, change: Callable[[np.ndarray], np.ndarray],
           batch_size: int) -> np.ndarray:  # fmt: skip
    from loupe.core.data import ManifestDataset
    from loupe.core.distributed import DistInfo, make_loader
    from loupe.core.evaluation import predict
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    ds = ManifestDataset(rows.reset_index(drop=True), [spec.label_names[0]], root=root,
                         transform=lambda a, m: prep(change(as_rgb8(a))))  # fmt: skip
    S, _, _ = predict(model, make_loader(ds, DistInfo(), batch_size=batch_size, train=False), device, "binary")
    return S[:, 0]


def _degrade_seeded(a: np.ndarray, *, condition: str, level: float, seed: int) -> np.ndarray:
    return degrade(a, condition, level, _content_seed(a, seed))


def _content_seed(a: np.ndarray, seed: int) -> int:
    """A noise seed fixed by the image's pixels (the same image gets the same noise in every run)."""
    return (seed * 1_000_003 + zlib.crc32(np.ascontiguousarray(a).tobytes())) % 2**32


def robustness_sweep(
    model,
    spec,
    rows: pd.DataFrame,
    root: str | Path,
    device,
    *,
    threshold: float,
    conditions: dict[str, tuple[float, ...]] | None = None,
    n_boot: int = 1000,
    groups: np.ndarray | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> pd.DataFrame:
    """Score ``rows`` (manifest rows with ``path`` and the spec's label column, 1 = fake) under each condition and
    level; one table row per (condition, level) with `detection_metrics`. The clean image is scored once and
    reused by every identity level."""
    conditions = conditions or SWEEP
    unknown = sorted(set(conditions) - set(SWEEP))
    if unknown:
        raise ConfigError(f"robustness conditions {unknown} are unknown; use {list(SWEEP)}")
    y = rows[spec.label_names[0]].to_numpy(dtype=np.float64)
    clean: np.ndarray | None = None
    out = []
    for condition, levels in conditions.items():
        for level in levels:
            if _IDENTITY.get(condition) == level:
                if clean is None:
                    clean = _score(model, spec, rows, Path(root), device, lambda a: a, batch_size)
                s = clean
            else:
                change = partial(_degrade_seeded, condition=condition, level=level, seed=seed)
                s = _score(model, spec, rows, Path(root), device, change, batch_size)
            m = detection_metrics(y, s, threshold, n_boot=n_boot, groups=groups, seed=seed)
            out.append({"condition": condition, "level": float(level), **m})
            log.info("robustness %s %g: AUROC %.3f [%.3f, %.3f]", condition, level, m["auroc"], m["ci_low"],
                     m["ci_high"])  # fmt: skip
    return pd.DataFrame(out)


def sweep_figure(table: pd.DataFrame, title: str = "robustness"):
    """AUROC (95 % CI bars) against the level of each condition, chance at 0.5; a matplotlib `Figure` (Agg)."""
    from matplotlib.figure import Figure

    conditions = list(dict.fromkeys(table["condition"]))
    fig = Figure(figsize=(3.2 * len(conditions), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(conditions), sharey=True))
    for ax, cond in zip(axes, conditions, strict=True):
        t = table[table["condition"] == cond]
        err = np.vstack([t["auroc"] - t["ci_low"], t["ci_high"] - t["auroc"]]).clip(min=0)
        ax.errorbar(t["level"], t["auroc"], yerr=err, marker="o", capsize=3, lw=1)
        ax.axhline(0.5, color="grey", ls="--", lw=0.8)
        ax.set(title=cond, xlabel={"jpeg": "quality", "blur": "sigma (px)", "downscale": "factor",
                                   "noise": "sigma (0..1)"}.get(cond, "level"), ylim=(0.3, 1.02))  # fmt: skip
        if cond in ("jpeg", "downscale"):
            ax.invert_xaxis()  # worse to the right everywhere
    axes[0].set_ylabel("test AUROC")
    fig.suptitle(title)
    return fig


def log_sweep(run, table: pd.DataFrame, workdir: Path, title: str = "robustness") -> dict[str, float]:
    """Write the table (CSV) and the plot (PNG) under ``workdir``, log both and one metric per row
    (``robust_<condition>_<level>_auroc``); returns those metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    table.to_csv(workdir / "robustness.csv", index=False)
    fig = sweep_figure(table, title)
    fig.savefig(workdir / "robustness.png", dpi=110)
    run.log_artifact(workdir / "robustness.csv", "robustness")
    run.log_artifact(workdir / "robustness.png", "robustness")
    metrics = {f"robust_{r.condition}_{r.level:g}_auroc".replace(".", "p"): float(r.auroc) for r in
               table.itertuples()}  # fmt: skip
    run.log_metrics(metrics)
    return metrics
