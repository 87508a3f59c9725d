"""Forensics detectors: real-vs-fake image classifiers on small ViTs and CLIP image towers, and the forensic preset.

- ``forensics_vit_micro_patch8`` (64 px, 4 blocks of 96: trains on a CPU in minutes), ``forensics_vit_tiny_patch16``
  (timm ViT-Ti/16) and ``forensics_clip_vit_b16`` / ``forensics_clip_vit_l14`` (open_clip ViT-B/16, ViT-L/14 image
  towers, as UnivFD and the LN-tuning detectors use; their weights come from the model's ``init`` source, e.g.
  ``hf-hub:timm/vit_base_patch16_clip_224.openai`` or ``file:open_clip_model.safetensors`` with layout
  ``open_clip``). Every builder takes ``normalize_features``: the head then reads the L2-normalised embedding (the
  hypersphere the ``ln_tune`` method's metric loss works on); it is stored in the weight spec's ``model_kwargs``, so
  a saved detector rebuilds the same way.
- ``forensics_mae_vit_*``: masked autoencoders over the same encoders, for in-domain self-supervised pretraining.
- `forensics_spec`: one binary label ``Fake``, RGB, and ``resize_mode="center_crop"`` by default: the central pixels
  are read as they are, never resampled, because the traces a detector reads (upsampling checkerboards, spectral
  peaks, JPEG grids) are what resizing smears.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from loupe.core.models.classifier import Classifier, vit_classifier
from loupe.core.models.spec import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, WeightSpec
from loupe.core.registry import MODELS, PRESETS

LABEL = "Fake"
FORENSIC_INTENSITY = "8-bit RGB / 255, as decoded: no resampling before the centre crop"

_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_micro_patch8": ("timm:vit_tiny_patch16_224", dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)),
    "vit_tiny_patch16": ("timm:vit_tiny_patch16_224", {}),
    "clip_vit_b16": ("open_clip:ViT-B-16", {}),
    "clip_vit_l14": ("open_clip:ViT-L-14", {}),
}
_DECODERS = {"vit_micro_patch8": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
             "vit_tiny_patch16": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8)}  # fmt: skip


class NormedHeadClassifier(Classifier):
    """A Classifier whose linear head (with bias) reads the L2-normalised pooled embedding: features live on the
    unit hypersphere, where a metric-learning loss shapes them; ``embedding`` output is the normalised one."""

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(F.normalize(self.backbone.pool(tokens), dim=-1)))  # [B, K]

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = F.normalize(self.backbone.pool(self.forward_features(x)), dim=-1)  # [B, D], unit norm
        return {"logits": self.head(self.head_drop(emb)), "embedding": emb}


def _builder(backbone: str, bound: dict[str, Any]):
    def build(*, normalize_features: bool = False, **kwargs: Any) -> Classifier:
        model = vit_classifier(backbone, **{**bound, **kwargs})
        if not normalize_features:
            return model
        num_outputs = model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
        return NormedHeadClassifier(model.backbone, num_outputs, head_drop=float(kwargs.get("head_drop", 0.0)))

    build.__doc__ = f"{backbone} {bound}; normalize_features=True puts the head on the unit hypersphere"
    return build


def _mae_builder(variant: str):
    def build(*, img_size: int = 224, mask_ratio: float = 0.75, norm_pix_loss: bool = True, **kwargs: Any):
        from loupe.core.models.mae import MAEConfig, MaskedAutoencoder

        dec = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("decoder_")}
        enc = MODELS.create(f"forensics_{variant}", num_outputs=0, in_chans=3, img_size=img_size, **kwargs)
        cfg = MAEConfig(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, **{**_DECODERS[variant], **dec})
        return MaskedAutoencoder(enc.backbone, cfg)

    build.__doc__ = f"MAE over forensics_{variant} (RGB), decoder {_DECODERS[variant]}, 75 % masked by default"
    return build


for _v, (_arch, _bound) in _VARIANTS.items():
    MODELS.register(f"forensics_{_v}", _builder(_arch, _bound), domain="forensics", backbone=_arch, **_bound)
    if _v in _DECODERS:
        MODELS.register(f"forensics_mae_{_v}", _mae_builder(_v), domain="forensics", backbone=_arch, kind="mae",
                        **_bound)  # fmt: skip


def is_clip(architecture: str) -> bool:
    """Whether a registered architecture is an open_clip image tower (CLIP normalisation)."""
    return str(MODELS.entry(architecture).meta.get("backbone", "")).startswith("open_clip:")


def forensics_spec(
    name: str,
    architecture: str,
    *,
    img_size: int = 64,
    resize_mode: str = "center_crop",
    **changes: Any,
) -> WeightSpec:
    """The weight spec of a binary real (0) / fake (1) detector: label ``Fake``, RGB ``img_size`` px, the centre
    crop without resampling unless ``resize_mode`` asks otherwise, CLIP normalisation for CLIP towers."""
    clip = architecture in MODELS and is_clip(architecture)
    base: dict[str, Any] = dict(
        name=name,
        architecture=architecture,
        task="binary",
        input_size=(3, img_size, img_size),
        mean=CLIP_MEAN if clip else IMAGENET_MEAN,
        std=CLIP_STD if clip else IMAGENET_STD,
        intensity=FORENSIC_INTENSITY,
        interpolation="bicubic",
        resize_mode=resize_mode,
        label_names=(LABEL,),
        domain="forensics",
        aggregation="mean",
        description="real (0) vs generated or manipulated (1) image detector",
    )
    return WeightSpec(**{**base, **changes})


PRESETS.register("forensics", forensics_spec("forensics-preset", "forensics_vit_micro_patch8"), domain="forensics",
                 channels=3, intensity=FORENSIC_INTENSITY)  # fmt: skip
