"""Grad-CAM maps for ViT classifiers (``pytorch_grad_cam``); `loupe.workflows.scoring.artifacts` stores them.

The target layer is the last block's first norm (timm ``norm1``, open_clip ``ln_1``): its output still has one
token per patch. Prefix tokens (CLS, registers) are dropped and the rest reshaped to the patch grid. The map is the
element-wise variant (``ReLU(gradient x activation)`` summed over channels), not the classic channel-mean
weighting: on ViTs the channel means of the gradient change sign from one training run to the next, and a model
trained to find a bright square then got a map that lit up everything *but* the square in about half the runs
(tests/workflows/scoring/test_explain.py); the element-wise map found the square in every run.

Each map is stored as data (16-bit PNG over the unit's region) and as a picture: the model's own input
(denormalised, exactly what the model saw) beside the same image under the map.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models import Classifier, WeightSpec

log = logging.getLogger(__name__)


def target_layer(model: Classifier) -> nn.Module:
    """The last transformer block's first LayerNorm."""
    last = model.backbone.blocks()[-1]
    for name in ("norm1", "ln_1"):
        if hasattr(last, name):
            return getattr(last, name)
    raise ConfigError(f"cannot explain {type(last).__name__} blocks: no norm1 / ln_1 layer to attach Grad-CAM to")


class ViTGradCAM:
    """Callable: (images ``[B, C, H, W]``, scores ``[B, K]``) → Grad-CAM maps ``[B, H, W]`` in 0..1 for each image's
    top label (and those label indices), or None when Grad-CAM fails (the scores are kept either way)."""

    def __init__(self, model: Classifier, spec: WeightSpec, device: str | torch.device = "cpu"):
        self.model, self.spec = model, spec
        self.device = torch.device(device)
        self.prefix = int(model.backbone.num_prefix_tokens)
        self.patch = int(model.backbone.patch_size)
        self._grid: tuple[int, int] = (1, 1)
        self.layer = target_layer(model)

    def _reshape(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self._grid
        x = tokens[:, self.prefix :, :]  # [B, gh*gw, D]
        return x.reshape(x.shape[0], gh, gw, x.shape[-1]).permute(0, 3, 1, 2)  # [B, D, gh, gw]

    def __call__(self, images: torch.Tensor, scores: torch.Tensor) -> tuple[np.ndarray, list[int]] | None:
        from pytorch_grad_cam import GradCAMElementWise
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self._grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        top = scores.argmax(-1).tolist()
        try:
            # hooks live only inside this block, so plain scoring forwards stay hook-free
            explain = GradCAMElementWise(self.model, [self.layer], reshape_transform=self._reshape)
            with torch.enable_grad(), explain as cam:
                maps = cam(input_tensor=images.to(self.device), targets=[ClassifierOutputTarget(k) for k in top])
        except Exception as exc:  # noqa: BLE001 - an explanation failure must not lose the scores
            log.warning("Grad-CAM failed for a batch of %d: %s", len(images), exc)
            return None
        finally:
            self.model.zero_grad(set_to_none=True)
        return np.asarray(maps, dtype=np.float32), top

    def display(self, image: torch.Tensor) -> np.ndarray:
        """A model input ``[C, H, W]`` denormalised to what the model saw, ``[H, W, 3]`` in 0..1."""
        mean = torch.tensor(self.spec.mean).view(-1, 1, 1)
        std = torch.tensor(self.spec.std).view(-1, 1, 1)
        x = (image.detach().cpu().float() * std + mean).clamp(0, 1)  # [C, H, W]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.permute(1, 2, 0).numpy().astype(np.float32)
