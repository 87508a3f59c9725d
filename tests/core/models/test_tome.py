"""Token merging: exact when it merges nothing, size-conserving, proportional attention, full-token paths kept."""

from __future__ import annotations

import pytest
import torch

from loupe.core.errors import ConfigError
from loupe.core.models import vit_classifier
from loupe.core.models.mae import MAEConfig, MaskedAutoencoder
from loupe.core.models.tome import (
    MergingForward,
    ToMeConfig,
    _timm_attention,
    apply_token_merging,
    merge_tokens,
    merging_config,
    merging_problems,
    merging_view,
    parse_tome,
    remove_token_merging,
    tokens_per_block,
)

NANO = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, img_size=32)  # 16 patch tokens + CLS


def nano(**kw: object):
    return vit_classifier("timm:vit_tiny_patch16_224", num_outputs=3, **{**NANO, **kw}).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("kind", ["timm_token", "timm_avg", "open_clip"])
def test_merging_nothing_gives_the_model_s_own_outputs(kind: str, x: torch.Tensor, clip_cfg) -> None:
    model = (vit_classifier(f"open_clip:{clip_cfg}", num_outputs=3).eval() if kind == "open_clip"
             else nano(global_pool="avg" if kind == "timm_avg" else "token"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(merging_view(model, ToMeConfig(r=0))(x), model(x), atol=1e-5, rtol=1e-5)
        merged = merging_view(model, ToMeConfig(r=3))
        depth = len(model.backbone.blocks())  # 16 patch tokens lose 3 per block
        assert merged.forward_features(x).shape[1] == 1 + 16 - 3 * depth
        assert not torch.allclose(merged(x), model(x))  # merging changes the result a little, not nothing


@pytest.mark.parametrize(("cfg", "depth", "expected"), [
    (ToMeConfig(r=3), 3, [16, 13, 10]),
    (ToMeConfig(r=3, schedule="decreasing"), 3, [16, 10, 7]),
    (ToMeConfig(r=(8, 8, 8)), 3, [16, 8, 4]),  # each merge is clamped to half the tokens
])  # fmt: skip
def test_tokens_left_follow_the_schedule(cfg: ToMeConfig, depth: int, expected: list[int], x: torch.Tensor) -> None:
    assert tokens_per_block(cfg, 16, depth) == expected
    model = nano(depth=depth)
    final = expected[-1] - min(cfg.per_block(depth)[-1], expected[-1] // 2)
    with torch.no_grad():
        assert merging_view(model, cfg).forward_features(x).shape == (2, 1 + final, 32)


def test_decreasing_schedule_removes_as_many_tokens_as_the_constant_one() -> None:
    assert sum(ToMeConfig(r=6, schedule="decreasing").per_block(12)) == pytest.approx(6 * 12, abs=6)
    assert ToMeConfig(r=6, schedule="decreasing").per_block(12)[0] == 12


def test_merge_keeps_prefix_first_and_conserves_size_weighted_sums() -> None:
    b, n, d = 2, 1 + 10, 4
    tokens = torch.randn(b, n, d)
    size = torch.rand(b, n, 1) + 0.5
    size[:, 0] = 1.0
    merged, new_size = merge_tokens(tokens, size, torch.randn(b, n, 6), r=3, prefix=1)
    assert merged.shape == (b, n - 3, d) and new_size.shape == (b, n - 3, 1)
    torch.testing.assert_close(merged[:, 0], tokens[:, 0])  # the CLS token is never merged
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size).sum(1), (tokens * size).sum(1))


def test_each_token_merges_into_its_most_similar_partner() -> None:
    # patch tokens alternate A (even) / B (odd); A0 is identical to B2 (patch 5), everything else is unrelated
    metric = torch.eye(8)[None]  # 8 patch tokens, orthogonal keys
    metric[0, 0] = metric[0, 5]
    x = torch.arange(8.0).reshape(1, 8, 1)
    merged, size = merge_tokens(x, None, metric, r=1, prefix=0)
    assert sorted(size[0, :, 0].tolist()) == [1.0] * 6 + [2.0]
    assert merged[0, size[0, :, 0] == 2.0, 0].item() == pytest.approx((0.0 + 5.0) / 2)


def test_proportional_attention_makes_a_merged_token_count_as_the_patches_it_holds() -> None:
    attn = nano().backbone.model.blocks[0].attn
    seq = torch.randn(1, 5, 32)
    dup = torch.cat([seq, seq[:, 2:3]], dim=1)  # token 2 twice
    size = torch.ones(1, 5, 1)
    size[0, 2] = 2.0
    with torch.no_grad():
        out_dup, _ = _timm_attention(attn, dup, None)
        out_merged, _ = _timm_attention(attn, seq, size.log()[:, None, None, :, 0])
        out_plain, _ = _timm_attention(attn, seq, None)
    torch.testing.assert_close(out_merged, out_dup[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_plain, out_dup[:, :5], atol=1e-4)


def test_average_pooling_weights_merged_tokens_by_their_size(x: torch.Tensor) -> None:
    model = nano(global_pool="avg")
    view = merging_view(model, ToMeConfig(r=3))
    fwd = view.backbone.forward_features
    assert isinstance(fwd, MergingForward)
    with torch.no_grad():
        tokens, size = fwd.tokens_and_sizes(x)
        weighted = (tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
        expected = model.backbone.model.fc_norm(weighted)
        torch.testing.assert_close(view.backbone.pool(view.forward_features(x)), expected, atol=1e-5, rtol=1e-5)


def test_the_original_model_keeps_every_token_and_its_weights(x: torch.Tensor) -> None:
    model = nano()
    view = merging_view(model, ToMeConfig(r=4))
    assert merging_config(model) is None and merging_config(view) == ToMeConfig(r=4)
    assert view.state_dict().keys() == model.state_dict().keys()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters(), strict=True))  # shared, not copied
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 17, 32)
        assert view.forward_features(x).shape[1] < 17


def test_patch_tokens_and_mae_keep_every_token_on_a_merging_backbone(x: torch.Tensor) -> None:
    model = nano()
    backbone = apply_token_merging(model.backbone, ToMeConfig(r=4))
    assert backbone.patch_tokens(x).shape == (2, 17, 32)
    mae = MaskedAutoencoder(backbone, MAEConfig(mask_ratio=0.5, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    loss, pred, mask = mae(x)
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.sum().item() == 16 and torch.isfinite(loss)
    assert remove_token_merging(backbone).forward_features(x).shape == (2, 17, 32)


def test_fine_tuning_with_merging_trains_every_block(x: torch.Tensor) -> None:
    model = nano().train()
    apply_token_merging(model.backbone, ToMeConfig(r=4))
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.model.blocks."):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("head", "message"), [("mask", "mask output"), ("mil", "attention-MIL head")])
def test_models_that_need_every_token_refuse_merging(head: str, message: str) -> None:
    model = vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, head=head, **NANO)
    assert message in merging_problems(model)[0]
    with pytest.raises(ConfigError, match=message):
        merging_view(model, ToMeConfig(r=2))


def test_attention_pooling_is_refused() -> None:
    model = nano(global_pool="map")
    with pytest.raises(ConfigError, match="attention-pooling head"):
        merging_view(model, ToMeConfig(r=2))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ToMeConfig(r=-1), "r must be a whole number"),
    (lambda: ToMeConfig(r=2, schedule="wavy"), "schedule must be"),
    (lambda: ToMeConfig(r=(2, 2), schedule="decreasing"), "its own schedule"),
    (lambda: ToMeConfig(r=(2, 2)).per_block(3), "lists 2 values but the backbone has 3 blocks"),
    (lambda: parse_tome("tomeX"), "tome8"),
])  # fmt: skip
def test_bad_merging_configs_are_refused_with_the_fix(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(("text", "cfg"), [
    ("tome8", ToMeConfig(r=8)),
    ("tome8d", ToMeConfig(r=8, schedule="decreasing")),
    ("tome[4,2,0]", ToMeConfig(r=(4, 2, 0))),
])  # fmt: skip
def test_merging_names_round_trip(text: str, cfg: ToMeConfig) -> None:
    assert parse_tome(text) == cfg and cfg.label == text
