"""Grad-CAM maps for ViT classifiers (``pytorch_grad_cam``), saved as PNG overlays beside the predictions table.

The target layer is the last block's first norm (timm ``norm1``, open_clip ``ln_1``): its output still has one
token per patch, and its gradient w.r.t. the explained class score is what Grad-CAM weights. Prefix tokens (CLS,
registers) are dropped and the rest reshaped to the patch grid. Each PNG shows the model's own input
(denormalised, i.e. exactly what the model saw) and, beside it, the same image under the Grad-CAM map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models import Classifier, WeightSpec

log = logging.getLogger(__name__)

MIN_SIDE = 256  # overlays of tiny model inputs are upscaled to at least this many pixels


def target_layer(model: Classifier) -> nn.Module:
    """The last transformer block's first LayerNorm."""
    last = model.backbone.blocks()[-1]
    for name in ("norm1", "ln_1"):
        if hasattr(last, name):
            return getattr(last, name)
    raise ConfigError(f"cannot explain {type(last).__name__} blocks: no norm1 / ln_1 layer to attach Grad-CAM to")


class ViTGradCAM:
    """Callable: (images ``[B, C, H, W]``, scores ``[B, K]``, items) → PNG path per image (or None on failure)."""

    def __init__(self, model: Classifier, spec: WeightSpec, out_dir: str | Path, device: str | torch.device = "cpu"):
        self.model, self.spec = model, spec
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.prefix = int(model.backbone.num_prefix_tokens)
        self.patch = int(model.backbone.patch_size)
        self._grid: tuple[int, int] = (1, 1)
        self.layer = target_layer(model)

    def _reshape(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self._grid
        x = tokens[:, self.prefix :, :]  # [B, gh*gw, D]
        return x.reshape(x.shape[0], gh, gw, x.shape[-1]).permute(0, 3, 1, 2)  # [B, D, gh, gw]

    def __call__(self, images: torch.Tensor, scores: torch.Tensor, items: list[Any]) -> list[str | None]:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        top = scores.argmax(-1).tolist()
        try:
            # hooks live only inside this block, so plain scoring forwards stay hook-free
            with torch.enable_grad(), GradCAM(self.model, [self.layer], reshape_transform=self._reshape) as cam:
                maps = cam(input_tensor=images.to(self.device), targets=[ClassifierOutputTarget(k) for k in top])
        except Exception as exc:  # noqa: BLE001 - an explanation failure must not lose the scores
            log.warning("Grad-CAM failed for a batch of %d: %s", len(items), exc)
            return [None] * len(items)
        finally:
            self.model.zero_grad(set_to_none=True)
        return [self._save(images[i], maps[i], items[i], top[i]) for i in range(len(items))]

    def _save(self, image: torch.Tensor, cam: np.ndarray, item: Any, label_idx: int) -> str:
        from PIL import Image
        from pytorch_grad_cam.utils.image import show_cam_on_image

        rgb = self._display(image)  # [H, W, 3] in 0..1
        # the film as the model saw it beside the overlay: a reader must see the anatomy under the heat
        overlay = show_cam_on_image(rgb, cam.astype(np.float32), use_rgb=True, image_weight=0.6)
        img = Image.fromarray(np.concatenate([(rgb * 255).round().astype(np.uint8), overlay], axis=1))
        if min(img.size) < MIN_SIDE:
            scale = MIN_SIDE / min(img.size)
            img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BILINEAR)
        label = "".join(c if c.isalnum() else "_" for c in self.spec.label_names[label_idx])
        dst = self.out_dir / f"{Path(item.path).stem}-{(item.sha256 or 'nohash')[:12]}-{label}.png"
        img.save(dst)
        return str(dst)

    def _display(self, image: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(self.spec.mean).view(-1, 1, 1)
        std = torch.tensor(self.spec.std).view(-1, 1, 1)
        x = (image.detach().cpu().float() * std + mean).clamp(0, 1)  # [C, H, W]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.permute(1, 2, 0).numpy().astype(np.float32)
