"""Data sources for the CXR recipes: PneumoniaMNIST (npz, official splits) and manifests (NIH / CheXpert).

Both yield the one sample contract ``{"image": [C, H, W] float, "label": [K] 1/0/NaN, "meta": {...}}``. Pixels go
through `loupe.core.transforms.ModelInput` built from the model's weight spec; training augmentation runs on whole
batches (`BatchAugment`, applied in the training step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from loupe.core.errors import ConfigError
from loupe.core.models.spec import WeightSpec
from loupe.core.transforms import ModelInput, to_unit_float


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from. ``source``: ``pneumoniamnist`` (npz) or ``manifest`` (CSV/Parquet).

    ``limit`` keeps the first N samples of each split (0 = all), for smoke runs and tests.
    Manifests keep their ``split`` column when they have one, else rows are split by patient with
    ``val_fraction`` / ``test_fraction``.
    """

    source: str = "pneumoniamnist"
    path: str = "../shared/data/cxr/pneumoniamnist/pneumoniamnist.npz"
    image_root: str = ""
    label_set: str = "cxr.pneumonia"
    limit: int = 0
    batch_size: int = 128
    num_workers: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def problems(self) -> list[str]:
        out = []
        if self.source not in ("pneumoniamnist", "manifest"):
            out.append(f"source: expected pneumoniamnist or manifest, got {self.source!r}")
        if self.batch_size < 1 or self.limit < 0:
            out.append("batch_size must be >= 1 and limit >= 0 (0 = all samples)")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            out.append("val_fraction and test_fraction must be in [0, 1)")
        return out


class TensorImageDataset(Dataset):
    """Images held in memory (uint8 ``[N, H, W]``) with labels ``[N, K]`` → samples through ``augment`` + spec."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, spec: WeightSpec):
        self.images, self.labels = images, labels.astype(np.float32)
        self.to_input = ModelInput(spec)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = to_unit_float(self.images[i])  # [1, H, W] in 0..1
        return {"image": self.to_input(t), "label": torch.from_numpy(self.labels[i]), "meta": {"index": i}}


def load_pneumoniamnist(path: str | Path, split: str, limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The official ``train`` / ``val`` / ``test`` split: images uint8 ``[N, 28, 28]``, labels float ``[N, 1]``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"data.path {str(p)!r} does not exist; point it at pneumoniamnist.npz "
            f"(MedMNIST v2, e.g. ../shared/data/cxr/pneumoniamnist/pneumoniamnist.npz)"
        )
    if split not in ("train", "val", "test"):
        raise ConfigError(f"PneumoniaMNIST split must be train, val or test, got {split!r}")
    with np.load(p) as d:
        images, labels = d[f"{split}_images"], d[f"{split}_labels"].astype(np.float32)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels.reshape(len(labels), -1)


@dataclass(frozen=True)
class BatchAugment:
    """Per-sample random augmentation of a whole normalised batch ``[B, C, H, W]`` in one affine warp.

    RandAug-like and light, for grey films: random-resized crop (area ``crop_scale``, aspect 3/4..4/3 squeezed to
    ``ratio``), rotation up to ``degrees``, shift up to ``translate`` (fraction of the side), and brightness /
    contrast factors in ``1 ± brightness`` / ``1 ± contrast``. Runs inside the training step, on the device, with
    torch's RNG: fast (one ``grid_sample`` per batch) and reproducible under `loupe.core.training` resume.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.75, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    degrees: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0

    @classmethod
    def randaug(cls, spec: WeightSpec, magnitude: float, crop_scale: tuple[float, float] = (0.75, 1.0)):
        """Fine-tuning preset: ``magnitude`` 0..1 scales rotation (≤15°), shift (≤10 %), brightness/contrast (≤40 %)."""
        m = float(magnitude)
        return cls(
            spec.mean, spec.std, crop_scale, degrees=15 * m, translate=0.1 * m, brightness=0.4 * m, contrast=0.4 * m
        )

    @classmethod
    def mae(cls, spec: WeightSpec, crop_scale: tuple[float, float] = (0.5, 1.0)):
        """MAE pretraining preset: random-resized crop only (the paper's 0.5–1.0 area range for chest films)."""
        return cls(spec.mean, spec.std, crop_scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        b, dev = x.shape[0], x.device
        mean = torch.tensor(self.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, -1, 1, 1)
        u = x * std + mean  # back to 0..1 intensities
        theta = self._theta(b).to(dev, x.dtype)
        grid = F.affine_grid(theta, list(u.shape), align_corners=False)
        u = F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.contrast > 0:
            c = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.contrast
            m = u.mean(dim=(1, 2, 3), keepdim=True)
            u = m + c * (u - m)
        if self.brightness > 0:
            u = u * (1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.brightness)
        return (u.clamp(0.0, 1.0) - mean) / std

    def _theta(self, b: int) -> torch.Tensor:
        """Affine matrices ``[B, 2, 3]`` mapping output to input coordinates (-1..1)."""
        lo, hi = self.crop_scale
        area = lo + torch.rand(b) * (hi - lo)
        log_r = torch.log(torch.tensor(self.ratio))
        r = torch.exp(log_r[0] + torch.rand(b) * (log_r[1] - log_r[0]))
        sw, sh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)  # crop size / side
        tx = (torch.rand(b) * 2 - 1) * (1 - sw) + (torch.rand(b) * 2 - 1) * 2 * self.translate
        ty = (torch.rand(b) * 2 - 1) * (1 - sh) + (torch.rand(b) * 2 - 1) * 2 * self.translate
        a = torch.deg2rad((torch.rand(b) * 2 - 1) * self.degrees)
        cos, sin = torch.cos(a), torch.sin(a)
        return torch.stack(
            [torch.stack([sw * cos, -sh * sin, tx], 1), torch.stack([sw * sin, sh * cos, ty], 1)], 1
        )  # [B, 2, 3]
