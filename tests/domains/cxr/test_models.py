from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import loupe.domains.cxr  # noqa: F401 - registers the CXR models
from loupe.core.models import build_model
from loupe.core.models.mae import MaskedAutoencoder
from loupe.core.registry import LABEL_SETS, MODELS, PRESETS
from loupe.domains.cxr.models import cxr_spec


def test_registered_names() -> None:
    for size in ("tiny", "small", "base"):
        assert f"cxr_vit_{size}_patch16" in MODELS and f"cxr_mae_vit_{size}_patch16" in MODELS
    assert len(LABEL_SETS.get("cxr.nih14")) == 14 and len(LABEL_SETS.get("cxr.chexpert")) == 14
    preset = PRESETS.get("cxr")
    assert preset.in_chans == 1 and "MONOCHROME2" in preset.intensity


def test_cxr_mae_builder_gives_a_one_channel_mae() -> None:
    mae = MODELS.create("cxr_mae_vit_micro_patch4", img_size=28, depth=2)
    assert isinstance(mae, MaskedAutoencoder) and mae.cfg.mask_ratio == 0.9
    loss, pred, mask = mae(torch.randn(2, 1, 28, 28))
    assert pred.shape == (2, 49, 16) and int(mask[0].sum()) == 44  # 49 patches, 5 visible at 90 % masking


def _medical_mae_vit_small(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint in the published medical-MAE layout: ViT-S/16, 3 channels, 224 px, ``{"model": ...}``."""
    enc = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    sd = {k: v for k, v in enc.state_dict().items()}
    dec = {
        "mask_token": torch.randn(1, 1, 512),
        "decoder_embed.weight": torch.randn(512, 384),
        "decoder_embed.bias": torch.randn(512),
        "decoder_pos_embed": torch.randn(1, 197, 512),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(1536, 512),
        "decoder_norm.weight": torch.ones(512),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, 512),
        "decoder_pred.bias": torch.randn(16 * 16 * 3),
    }
    torch.save({"model": {**sd, **dec}, "epoch": 799, "args": "see the paper"}, path)
    return sd


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_published_medical_mae_layout_loads_the_encoder_exactly(tmp_path: Path, global_pool: str) -> None:
    sd = _medical_mae_vit_small(tmp_path / "vit-s_CXR_0.3M_mae.pth")
    spec = cxr_spec("m", "cxr_vit_small_patch16", LABEL_SETS.get("cxr.nih14"), in_chans=3,
                    source=f"file:{tmp_path / 'vit-s_CXR_0.3M_mae.pth'}", layout="mae",
                    model_kwargs={"global_pool": global_pool})  # fmt: skip
    model, report = build_model(spec)
    loaded = model.backbone.model.state_dict()
    # with average pooling the fine-tuning model replaces the final norm by fc_norm (MAE reference)
    expected = {k: v for k, v in sd.items() if not (global_pool == "avg" and k.startswith("norm."))}
    assert len(expected) >= 148  # patch embed, tokens, 12 blocks x 12 tensors (+ final norm with token pooling)
    for k, v in expected.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert model.head.out_features == 14
    assert any("dropped 8 decoder" in c for c in report.conversions)


def test_medical_mae_three_to_one_channel(tmp_path: Path) -> None:
    sd = _medical_mae_vit_small(tmp_path / "mae.pth")
    spec = cxr_spec("m", "cxr_vit_small_patch16", ("Pneumonia",), in_chans=1, source=f"file:{tmp_path / 'mae.pth'}",
                    layout="mae")  # fmt: skip
    model, report = build_model(spec)
    loaded = model.backbone.model.state_dict()
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(loaded["blocks.11.mlp.fc2.weight"], sd["blocks.11.mlp.fc2.weight"], rtol=0, atol=0)
    assert any("3→1 input channels" in c for c in report.conversions)
    assert model(torch.randn(1, 1, 224, 224)).shape == (1, 1)


def test_cxr_models_are_scoped_to_radiographs() -> None:
    spec = cxr_spec("m", "cxr_vit_micro_patch4", ("Pneumonia",), img_size=28)
    assert spec.modalities == ("CR", "DX", "RG")
    assert cxr_spec("m", "cxr_vit_micro_patch4", ("Pneumonia",), img_size=28, modalities=()).modalities == ()
