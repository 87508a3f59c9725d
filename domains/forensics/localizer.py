"""The manipulation localiser and its loss (the recipe, data and evaluation: `loupe.domains.forensics.localize`).

The model (after IML-ViT, Ma et al. 2023, shrunk): the shared Backbone's tokens are taken at several evenly spaced
transformer blocks (forward hooks on ``backbone.blocks()``, so any Backbone works), each level is projected and
resampled to its own stride (shallow blocks finest: x4, x2, x1, x0.5 of the patch grid, the ViTDet simple pyramid),
fused top-down and by concatenation (a UPerNet-lite decoder, `PyramidDecoder`), and upsampled to the input size:
``mask_logits`` ``[B, 1, H, W]``. The image score (label ``Manipulated``) is an affine map of the mean of the top
``topk_fraction`` mask logits, so an image is as manipulated as its most manipulated region. The decoder is the
model's ``mask_head`` and the affine map its ``head``: an MAE checkpoint of the encoder loads into it as into a
classifier (heads start fresh).

Inputs are squashed to the square input size (``resize_mode: squash``): the mask must cover the whole picture, and a
centre crop would leave the borders unseen and unscored. The price is one resampling of the picture (traces such as
JPEG grids are smeared); the scoring engine places the input-sized mask back on the file's frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.backbones import Backbone
from loupe.core.models.classifier import Classifier
from loupe.core.registry import MODELS
from loupe.domains.forensics.models import forensics_spec

log = logging.getLogger(__name__)
LABEL = "Manipulated"
#: Per-level resampling of the patch grid, shallowest level first (the ViTDet simple feature pyramid).
PYRAMID = (4.0, 2.0, 1.0, 0.5)


# ------------------------------------------------------------------------------------------------------- model
def block_indices(depth: int, levels: int) -> list[int]:
    """``levels`` evenly spaced block indices ending at the last block: depth 12, 4 levels → [2, 5, 8, 11]."""
    if not 1 <= levels <= min(depth, len(PYRAMID)):
        raise ConfigError(f"levels must be in [1, {min(depth, len(PYRAMID))}] for a {depth}-block backbone, "
                          f"got {levels}")  # fmt: skip
    return [round((i + 1) * depth / levels) - 1 for i in range(levels)]


def _resampler(dim: int, scale: float) -> nn.Module:
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim, 2, 2)
    return nn.MaxPool2d(2) if scale == 0.5 else nn.Identity()


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(8, cout), nn.GELU())


class PyramidDecoder(nn.Module):
    """Token grids of several blocks → one logit map at the finest level's resolution.

    Each level: LayerNorm + linear to ``dim`` per token, reshaped to the grid, resampled by its `PYRAMID` scale;
    then a top-down pass (coarser levels upsampled and added), a 3x3 conv per level, all levels upsampled to the
    finest, concatenated, fused by a 1x1 conv and read out by a 1x1 conv. GroupNorm: batch-size independent.
    """

    def __init__(self, token_dim: int, levels: int, dim: int = 64, prior: float = 0.1):
        super().__init__()
        if dim < 8 or dim % 8:
            raise ConfigError(f"decoder_dim must be a multiple of 8 (GroupNorm groups), got {dim}")
        self.norms = nn.ModuleList(nn.LayerNorm(token_dim) for _ in range(levels))
        self.lateral = nn.ModuleList(nn.Linear(token_dim, dim) for _ in range(levels))
        self.resample = nn.ModuleList(_resampler(dim, s) for s in PYRAMID[:levels])
        self.smooth = nn.ModuleList(_conv(dim, dim, 3) for _ in range(levels))
        self.fuse = _conv(dim * levels, dim, 1)  # 1x1 at the finest level: a 3x3 there costs most of the CPU time
        self.predict = nn.Conv2d(dim, 1, 1)
        nn.init.constant_(self.predict.bias, float(np.log(prior / (1 - prior))))  # start near the tampered share

    def forward(self, grids: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``grids``: per level ``[B, gh, gw, D_tok]``, shallowest first → mask logits ``[B, 1, *size]``."""
        feats = []
        for g, norm, lat, res in zip(grids, self.norms, self.lateral, self.resample, strict=True):
            feats.append(res(lat(norm(g)).permute(0, 3, 1, 2)))  # [B, dim, gh*s, gw*s]
        for i in range(len(feats) - 2, -1, -1):  # top-down: coarse context into finer levels
            feats[i] = feats[i] + F.interpolate(feats[i + 1], size=feats[i].shape[-2:], mode="bilinear")
        fine = feats[0].shape[-2:]
        up = [F.interpolate(s(f), size=fine, mode="bilinear") for f, s in zip(feats, self.smooth, strict=True)]
        logits = self.predict(self.fuse(torch.cat(up, 1)))  # [B, 1, 4gh, 4gw]
        return F.interpolate(logits, size=size, mode="bilinear")  # [B, 1, H, W]


class ManipulationLocalizer(Classifier):
    """Backbone + `PyramidDecoder` (``mask_head``) + the image score from the top mask logits (``head``: a 1→1
    affine map, identity at start). Named outputs: ``logits`` ``[B, 1]``, ``embedding`` ``[B, D]``,
    ``mask_logits`` ``[B, 1, H, W]``."""

    def __init__(self, backbone: Backbone, num_outputs: int = 1, *, levels: int = 4, decoder_dim: int = 64,
                 topk_fraction: float = 0.02):  # fmt: skip
        if num_outputs != 1:
            raise ConfigError(f"a localiser has one label ({LABEL}); got num_outputs={num_outputs}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ConfigError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        super().__init__(backbone, 0)
        self.indices = block_indices(len(backbone.blocks()), levels)
        self.topk_fraction = topk_fraction
        self.head = nn.Linear(1, 1)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.mask_head = PyramidDecoder(backbone.token_dim, levels, decoder_dim)

    def _levels(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Token grids of the chosen blocks ``[B, gh, gw, D_tok]`` and the final tokens ``[B, N, D_tok]``."""
        grabbed: dict[int, torch.Tensor] = {}
        blocks = self.backbone.blocks()
        hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: grabbed.__setitem__(i, out))
                 for i in self.indices]  # fmt: skip
        try:
            tokens = self.backbone.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        b, (gh, gw), p = x.shape[0], self.backbone.grid_size(x), self.backbone.num_prefix_tokens
        grids = []
        for i in self.indices:
            t = grabbed[i]
            t = t if t.shape[0] == b else t.transpose(0, 1)  # sequence-first towers (older open_clip)
            grids.append(t[:, p:].reshape(b, gh, gw, t.shape[-1]))
        return grids, tokens

    def image_logits(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` → ``[B, 1]``: the head over the mean of each image's top ``topk_fraction`` logits."""
        flat = mask_logits.flatten(1)
        k = max(1, round(self.topk_fraction * flat.shape[1]))
        return self.head(flat.topk(k, dim=1).values.mean(1, keepdim=True))

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grids, tokens = self._levels(x)
        mask = self.mask_head(grids, tuple(x.shape[-2:]))
        return {"logits": self.image_logits(mask), "embedding": self.backbone.pool(tokens), "mask_logits": mask}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_outputs(x)["logits"]  # [B, 1]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a localiser scores from its mask, which needs the intermediate blocks: call the model "
                          "or forward_outputs(x) on images, not forward_head on final tokens")  # fmt: skip


def _loc_builder(variant: str):
    def build(*, num_outputs: int = 1, levels: int = 4, decoder_dim: int = 64, topk_fraction: float = 0.02,
              **kwargs: Any) -> ManipulationLocalizer:  # fmt: skip
        encoder = MODELS.create(f"forensics_{variant}", num_outputs=0, **kwargs)
        return ManipulationLocalizer(encoder.backbone, num_outputs, levels=levels, decoder_dim=decoder_dim,
                                     topk_fraction=topk_fraction)  # fmt: skip

    build.__doc__ = f"forensics_{variant} encoder + pyramid mask decoder + top-k image score"
    return build


for _v, _arch in (("vit_micro_patch8", "timm:vit_tiny_patch16_224"), ("vit_tiny_patch16", "timm:vit_tiny_patch16_224")):
    MODELS.register(f"forensics_loc_{_v}", _loc_builder(_v), domain="forensics", backbone=_arch, kind="localizer")


def localize_spec(name: str, architecture: str = "forensics_loc_vit_micro_patch8", *, img_size: int = 128,
                  **changes: Any):  # fmt: skip
    """A localiser's weight spec: label ``Manipulated``, outputs scores + mask + embedding, ``squash`` resizing (the
    mask covers the whole picture; see the module docstring)."""
    base: dict[str, Any] = dict(
        label_names=(LABEL,),
        outputs=("scores", "mask", "embedding"),
        aggregation="max",
        intensity="8-bit RGB / 255, squashed to the input size",
        description="manipulation localiser: per-pixel tampering probability + image score",
    )
    return forensics_spec(name, architecture, img_size=img_size, resize_mode="squash", **{**base, **changes})


# -------------------------------------------------------------------------------------------------------- loss
def edge_band(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The boundary band of binary masks ``[B, 1, H, W]``: dilated minus eroded by a ``2 * width + 1`` square, i.e.
    the pixels within ``width`` (Chebyshev) of a change between tampered and authentic. The picture's border is not a
    boundary (pooling pads with -inf)."""
    k = 2 * width + 1
    return F.max_pool2d(mask, k, 1, width) + F.max_pool2d(-mask, k, 1, width)  # dilate - erode, [B, 1, H, W]


@dataclass(frozen=True)
class LossWeights:
    """Mask BCE (weight 1) + ``dice`` x soft Dice + ``edge`` x BCE over the boundary band + ``image`` x BCE of the
    image score; ``edge_width`` in pixels of the model's input."""

    dice: float = 1.0
    edge: float = 2.0
    image: float = 0.5
    edge_width: int = 2


def localization_loss(out: dict[str, torch.Tensor], mask: torch.Tensor, label: torch.Tensor,
                      w: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:  # fmt: skip
    """The parts and ``total`` of the training loss: ``out`` the model's named outputs, ``mask`` ``[B, 1, H, W]``
    0/1, ``label`` ``[B]`` 0/1."""
    logits = out["mask_logits"].float()
    pixel = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")  # [B, 1, H, W]
    p = logits.sigmoid()
    inter, total = (p * mask).sum((1, 2, 3)), p.sum((1, 2, 3)) + mask.sum((1, 2, 3))
    dice = (1 - (2 * inter + 1) / (total + 1)).mean()  # +1 smoothing: an empty truth and prediction cost 0
    band = edge_band(mask, w.edge_width)
    edge = (pixel * band).sum() / band.sum().clamp_min(1.0)
    image = F.binary_cross_entropy_with_logits(out["logits"][:, 0].float(), label.float())
    parts = {"bce": pixel.mean(), "dice": dice, "edge": edge, "image": image}
    parts["total"] = parts["bce"] + w.dice * dice + w.edge * edge + w.image * image
    return parts
