"""CXR models and the CXR preprocessing preset.

- ``cxr_vit_{tiny,small,base}_patch16``: multi-label ViT classifiers (global average pooling + fc_norm, as in the
  medical-MAE fine-tuning code), 1-channel by default; ``cxr_vit_micro_patch4`` is the small grid model for
  28 px PneumoniaMNIST films.
- ``cxr_mae_vit_{tiny,small,base}_patch16`` / ``cxr_mae_vit_micro_patch4``: the matching masked autoencoders
  (encoder = the classifier's backbone, plus a light decoder).
- `cxr_spec`: a `WeightSpec` carrying the CXR intensity convention (grey, MONOCHROME2 = bright bone, 0..1).
"""

from __future__ import annotations

from typing import Any

from loupe.core.models.classifier import register_vit
from loupe.core.models.mae import MAEConfig, MaskedAutoencoder
from loupe.core.models.spec import WeightSpec
from loupe.core.registry import MODELS, PRESETS

CXR_INTENSITY = "grey film, MONOCHROME2 (bright = dense), 8-bit PNG or VOI-windowed DICOM, scaled to 0..1"
CXR_MEAN, CXR_STD = (0.5,), (0.25,)

# name → (timm architecture, bound sizes)
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "micro_patch4": ("timm:vit_tiny_patch16_224", dict(patch_size=4, embed_dim=192, depth=6, num_heads=3)),
    "tiny_patch16": ("timm:vit_tiny_patch16_224", {}),
    "small_patch16": ("timm:vit_small_patch16_224", {}),
    "base_patch16": ("timm:vit_base_patch16_224", {}),
}
# MAE decoders: the paper's 512-wide, 8-deep decoder for the big models, a narrow one for small films
_DECODERS: dict[str, dict[str, int]] = {
    "micro_patch4": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4),
    "tiny_patch16": dict(decoder_dim=256, decoder_depth=4, decoder_heads=8),
    "small_patch16": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "base_patch16": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
}


def _mae_builder(variant: str):
    def build(
        *,
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 224,
        mask_ratio: float = 0.9,
        norm_pix_loss: bool = True,
        **kwargs: Any,
    ) -> MaskedAutoencoder:
        dec = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("decoder_")}
        kwargs.setdefault("global_pool", "token")  # the encoder keeps its final norm, as in the MAE reference
        enc = MODELS.create(f"cxr_vit_{variant}", num_outputs=0, in_chans=in_chans, img_size=img_size, **kwargs)
        cfg = MAEConfig(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, **{**_DECODERS[variant], **dec})
        return MaskedAutoencoder(enc.backbone, cfg)

    build.__doc__ = f"MAE over cxr_vit_{variant}: decoder {_DECODERS[variant]}, mask ratio 0.9 by default"
    return build


for _v, (_arch, _bound) in _VARIANTS.items():
    register_vit(f"cxr_vit_{_v}", _arch, domain="cxr", global_pool="avg", **_bound)
    MODELS.register(f"cxr_mae_vit_{_v}", _mae_builder(_v), domain="cxr", backbone=_arch, kind="mae", **_bound)


# Radiographs: computed (CR), digital (DX) and film-screen (RG). A CT, MR or ultrasound image is refused by a CXR
# model rather than given a confident, meaningless score.
CXR_MODALITIES = ("CR", "DX", "RG")


def cxr_spec(
    name: str,
    architecture: str,
    label_names: tuple[str, ...],
    *,
    img_size: int = 224,
    in_chans: int = 1,
    **changes: Any,
) -> WeightSpec:
    """A CXR weight spec: grey (or grey replicated to RGB for 3-channel weights), CXR mean/std, bilinear squash,
    radiograph modalities only (``modalities=()`` in ``changes`` accepts any)."""
    mean = CXR_MEAN * in_chans
    std = CXR_STD * in_chans
    base = dict(
        name=name,
        architecture=architecture,
        task="multilabel",
        input_size=(in_chans, img_size, img_size),
        mean=mean,
        std=std,
        intensity=CXR_INTENSITY,
        interpolation="bilinear",
        resize_mode="squash",
        label_names=tuple(label_names),
        domain="cxr",
        modalities=CXR_MODALITIES,
    )
    return WeightSpec(**{**base, **changes})


PRESETS.register(
    "cxr",
    cxr_spec("cxr-preset", "cxr_vit_small_patch16", ()),
    domain="cxr",
    channels=1,
    mean=CXR_MEAN,
    std=CXR_STD,
    intensity=CXR_INTENSITY,
)
