from __future__ import annotations

import pytest
import timm
import torch

from loupe.core.errors import ConfigError, UnknownNameError
from loupe.core.models import OpenClipText, create_backbone
from loupe.core.models.backbones import build_open_clip
from loupe.core.registry import MODELS


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [32, 48, (32, 64)])
def test_tiny_timm_vit_from_registry_runs_any_size_and_channels(in_chans: int, size: int | tuple[int, int]) -> None:
    model = MODELS.create("test_vit_nano", num_outputs=3, in_chans=in_chans, img_size=32)
    hw = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, in_chans, *hw)
    tokens = model.forward_features(x)
    n_patches = (hw[0] // 8) * (hw[1] // 8)
    assert tokens.shape == (2, n_patches + model.backbone.num_prefix_tokens, 32)
    assert model(x).shape == (2, 3)
    assert model.backbone.patch_size == 8 and model.backbone.embed_dim == 32


def test_timm_pool_is_timms_own_head() -> None:
    bb = create_backbone("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    expected = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(bb(x), expected)


def test_tiny_open_clip_tokens_and_pool_match_open_clip(clip_cfg) -> None:
    model = MODELS.create("test_clip_nano", num_outputs=0)
    bb = model.backbone
    x = torch.randn(2, 3, 32, 32)
    tokens = bb.forward_features(x)
    assert tokens.shape == (2, 1 + 16, 64) and bb.num_prefix_tokens == 1
    torch.testing.assert_close(bb.pool(tokens), bb.visual(x))
    assert bb.embed_dim == 32 and bb.token_dim == 64
    # another input size interpolates the position embeddings
    assert bb(torch.randn(1, 3, 48, 48)).shape == (1, 32)


def test_open_clip_text_side_is_normalised(clip_cfg) -> None:
    text = OpenClipText(build_open_clip(str(clip_cfg)), str(clip_cfg))
    emb = text(["a chest radiograph", "a photo of a cat"])
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert text.tokenize(["x"]).shape == (1, 16)


def test_wrong_channels_and_size_name_the_fix() -> None:
    model = MODELS.create("test_vit_nano", num_outputs=1, in_chans=1, img_size=32)
    with pytest.raises(ConfigError, match=r"in_chans=1.*expected \[B, 1, H, W\]"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="not a multiple of the patch size 8"):
        model(torch.randn(1, 1, 30, 32))


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'test_vit_nano'"):
        MODELS.create("test_vit_nan")
    with pytest.raises(UnknownNameError, match="vit_small_patch16_224"):
        create_backbone("timm:vit_smal_patch16_224")
    with pytest.raises(ConfigError, match="write 'timm:vit_base_patch16_224'"):
        create_backbone("vit_base_patch16_224")


def test_non_vit_timm_model_is_refused() -> None:
    assert timm.is_model("resnet18")
    with pytest.raises(ConfigError, match="resnet18"):
        create_backbone("timm:resnet18")


def test_open_clip_backbone_trains_under_ddp(clip_cfg, tmp_path) -> None:
    """An image Backbone holds only the visual tower: under DDP every parameter gets a gradient, step after step."""
    import torch.distributed as dist

    model = MODELS.create("test_clip_nano", num_outputs=2)
    assert not any(n.startswith("backbone.clip.transformer") for n, _ in model.named_parameters())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(3):  # the reducer complains at the second step when a parameter got no gradient
            loss = ddp(torch.randn(2, 3, 32, 32)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
