"""Pathology models and the H&E preset: tile classifiers on small ViTs, their attention-MIL and zero-shot forms.

- ``path_vit_micro_patch8`` (CPU-sized, 64 px tiles), ``path_vit_tiny_patch16`` / ``path_vit_small_patch16``
  (224 px): RGB ViTs, ImageNet normalisation (what pathology foundation models use).
- `pathology_spec`: a `WeightSpec` with the tiling the model was trained at (``unit_options``: tile size in
  microns) and its magnification scope (slides whose level-0 resolution is more than twice coarser than the tiles
  are refused: they would be upsampled).
"""

from __future__ import annotations

from typing import Any

from loupe.core.models.classifier import register_vit
from loupe.core.models.spec import IMAGENET_MEAN, IMAGENET_STD, WeightSpec
from loupe.core.registry import MODELS, PRESETS

HE_INTENSITY = "brightfield H&E, RGB 8-bit / 255"

_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "micro_patch8": ("timm:vit_tiny_patch16_224", dict(patch_size=8, embed_dim=96, depth=4, num_heads=3)),
    "tiny_patch16": ("timm:vit_tiny_patch16_224", {}),
    "small_patch16": ("timm:vit_small_patch16_224", {}),
}
_DECODERS = {"micro_patch8": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
             "tiny_patch16": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8),
             "small_patch16": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)}  # fmt: skip


def _mae_builder(variant: str):
    def build(*, img_size: int = 224, mask_ratio: float = 0.75, norm_pix_loss: bool = True, **kwargs: Any):
        from loupe.core.models.mae import MAEConfig, MaskedAutoencoder
        from loupe.core.registry import MODELS

        dec = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("decoder_")}
        enc = MODELS.create(f"path_vit_{variant}", num_outputs=0, in_chans=3, img_size=img_size, **kwargs)
        cfg = MAEConfig(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, **{**_DECODERS[variant], **dec})
        return MaskedAutoencoder(enc.backbone, cfg)

    build.__doc__ = f"MAE over path_vit_{variant} (RGB), decoder {_DECODERS[variant]}, 75 % masked by default"
    return build


for _v, (_arch, _bound) in _VARIANTS.items():
    register_vit(f"path_vit_{_v}", _arch, domain="pathology", **_bound)
    MODELS.register(f"path_mae_vit_{_v}", _mae_builder(_v), domain="pathology", backbone=_arch, kind="mae", **_bound)


def pathology_spec(
    name: str,
    architecture: str,
    label_names: tuple[str, ...],
    *,
    tile_px: int = 224,
    tile_mpp: float = 0.5,
    task: str = "multiclass",
    aggregation: str = "topk:8",
    **changes: Any,
) -> WeightSpec:
    base: dict[str, Any] = dict(
        name=name,
        architecture=architecture,
        task=task,
        input_size=(3, tile_px, tile_px),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        intensity=HE_INTENSITY,
        interpolation="bicubic",
        label_names=tuple(label_names),
        domain="pathology",
        aggregation=aggregation,
        unit_options={"tile_mpp": tile_mpp},
        scope={"mpp_um": {"max": 2 * tile_mpp}},
    )
    return WeightSpec(**{**base, **changes})


PRESETS.register("pathology", pathology_spec("pathology-preset", "path_vit_tiny_patch16", ()), domain="pathology",
                 channels=3, intensity=HE_INTENSITY)  # fmt: skip
