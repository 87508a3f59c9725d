from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec, build_model, create_backbone
from loupe.core.models.mae import MAEConfig, MaskedAutoencoder, patchify, sincos_pos_embed, unpatchify

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _mae(in_chans: int = 1, ratio: float = 0.75, **kw) -> MaskedAutoencoder:
    backbone = create_backbone("timm:vit_tiny_patch16_224", in_chans=in_chans, img_size=16, **TINY)
    return MaskedAutoencoder(
        backbone, MAEConfig(mask_ratio=ratio, decoder_dim=16, decoder_depth=1, decoder_heads=2, **kw)
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("ratio,keep", [(0.75, 4), (0.9, 2), (0.5, 8), (0.0, 16)])
def test_masking_ratio_and_encoder_sees_only_visible_tokens(ratio: float, keep: int) -> None:
    mae = _mae(ratio=ratio)
    seen: list[tuple[int, ...]] = []
    encode = mae.backbone.encode
    mae.backbone.encode = lambda t: (seen.append(tuple(t.shape)), encode(t))[1]  # type: ignore[method-assign]
    loss, pred, mask = mae(torch.randn(3, 1, 16, 16))
    assert seen == [(3, 1 + keep, 32)]  # class token + the visible patches of a 4x4 grid
    assert pred.shape == (3, 16, 16) and mask.shape == (3, 16)
    torch.testing.assert_close(mask.sum(1), torch.full((3,), 16.0 - keep))
    assert torch.isfinite(loss)


def test_loss_is_taken_on_masked_patches_only() -> None:
    mae = _mae(norm_pix_loss=False)
    x = torch.randn(2, 1, 16, 16)
    _, pred, mask = mae(x)
    target = patchify(x, 4)
    tampered = torch.where(mask[..., None].bool(), pred, target + 100.0)  # visible patches wildly wrong
    torch.testing.assert_close(mae.loss(x, tampered, mask), mae.loss(x, pred, mask))


@pytest.mark.parametrize("c", [1, 3])
def test_patchify_round_trip_any_channels(c: int) -> None:
    x = torch.randn(2, c, 16, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 12, 16 * c)
    torch.testing.assert_close(unpatchify(p, 4, c, (4, 3)), x)


def test_loss_decreases_on_a_fixed_batch() -> None:
    mae = _mae(ratio=0.5)
    x = torch.randn(8, 1, 16, 16)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(40):
        loss, _, _ = mae(x, generator=g.manual_seed(1))  # the same mask every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_sincos_position_embedding_values() -> None:
    pe = sincos_pos_embed(8, (2, 2))
    assert pe.shape == (4, 8)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(pe[1, 0], torch.sin(torch.tensor(1.0)))  # x = 1 for the second patch


def test_mae_layout_round_trip_gives_the_exact_encoder(tmp_path: Path) -> None:
    mae = _mae()
    sd = mae.mae_state_dict()
    assert "decoder_embed.weight" in sd and "mask_token" in sd and "blocks.0.attn.qkv.weight" in sd
    save_file(sd, str(tmp_path / "mae.safetensors"))
    from loupe.core.models import register_vit
    from loupe.core.registry import MODELS

    if "test_mae_tiny" not in MODELS:
        register_vit("test_mae_tiny", "timm:vit_tiny_patch16_224", **TINY)
    spec = WeightSpec(name="t", architecture="test_mae_tiny", source=f"file:{tmp_path / 'mae.safetensors'}",
                      layout="mae", input_size=(1, 16, 16), mean=(0.5,), std=(0.25,), label_names=("a",))  # fmt: skip
    model, report = build_model(spec)
    inner = model.backbone.model.state_dict()
    for k, v in mae.backbone.model.state_dict().items():
        torch.testing.assert_close(inner[k], v, rtol=0, atol=0)
    assert report is not None and any("decoder" in c for c in report.conversions)


def test_open_clip_backbone_works_as_mae_encoder(tmp_path: Path) -> None:
    import json

    vision = {"image_size": 16, "layers": 2, "width": 32, "patch_size": 4, "head_width": 16}
    text = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg = {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    backbone = create_backbone(f"open_clip:{tmp_path / 'c.json'}")
    mae = MaskedAutoencoder(backbone, MAEConfig(mask_ratio=0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    loss, pred, _ = mae(torch.randn(2, 3, 16, 16))
    assert pred.shape == (2, 16, 48) and torch.isfinite(loss)
    loss.backward()
    assert backbone.visual.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "cfg,message",
    [
        (MAEConfig(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\), got 1.0"),
        (MAEConfig(decoder_dim=30, decoder_heads=4), r"decoder_dim \(30\) must be divisible by decoder_heads \(4\)"),
    ],
)
def test_bad_mae_config_is_refused(cfg: MAEConfig, message: str) -> None:
    backbone = create_backbone("timm:vit_tiny_patch16_224", in_chans=1, img_size=16, **TINY)
    with pytest.raises(ConfigError, match=message):
        MaskedAutoencoder(backbone, cfg)


def test_norm_pix_loss_targets_each_patch_normalised() -> None:
    """The paper's default: each masked patch is compared with its own pixels normalised to mean 0, variance 1, so
    a patch's brightness and contrast do not matter, only its structure."""
    mae = _mae(norm_pix_loss=True)
    x = torch.randn(2, 1, 16, 16)
    _, pred, mask = mae(x)
    patches = patchify(x, 4)  # [2, 16, 16]
    normalised = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = (((pred - normalised) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae.loss(x, pred, mask), expected)
    brighter = x * 3.0 + 5.0  # the same structure, another exposure: the normalised targets do not change
    torch.testing.assert_close(mae.loss(brighter, pred, mask), expected, rtol=1e-4, atol=1e-4)
    plain = _mae(norm_pix_loss=False)
    assert not torch.isclose(plain.loss(brighter, pred, mask), mae.loss(brighter, pred, mask))
