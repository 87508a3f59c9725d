from __future__ import annotations

import math

import pytest
import torch

from loupe.core.errors import ConfigError
from loupe.core.models import vit_classifier
from loupe.core.optim import WarmupCosine, adamw, layer_ids, param_groups


@pytest.fixture
def model():
    return vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, in_chans=1, img_size=16, patch_size=4,
                          embed_dim=32, depth=3, num_heads=2)  # fmt: skip


def test_layer_ids_follow_the_blocks(model) -> None:
    ids = layer_ids(model, model.backbone)
    assert ids["backbone.model.patch_embed.proj.weight"] == 0
    assert ids["backbone.model.pos_embed"] == 0 and ids["backbone.model.cls_token"] == 0
    assert ids["backbone.model.blocks.0.attn.qkv.weight"] == 1
    assert ids["backbone.model.blocks.2.mlp.fc2.bias"] == 3
    assert ids["backbone.model.norm.weight"] == 4 and ids["head.weight"] == 4


def test_lr_groups_decay_per_layer(model) -> None:
    groups = param_groups(model, model.backbone, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["backbone.model.blocks.2.attn.proj.weight"] == 0.5
    assert scale["backbone.model.blocks.0.attn.proj.weight"] == 0.125
    assert scale["backbone.model.patch_embed.proj.weight"] == 0.0625
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["backbone.model.pos_embed"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = adamw(groups, lr=1e-3)
    WarmupCosine(1e-3, 10).apply(opt, 0)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert math.isclose(lrs["backbone.model.blocks.0.attn.proj.weight"], 1e-3 * 0.125)


def test_frozen_parameters_are_left_out(model) -> None:
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    groups = param_groups(model, model.backbone)
    assert sorted(n for g in groups for n in g["names"]) == ["head.bias", "head.weight"]


def test_warmup_then_cosine() -> None:
    s = WarmupCosine(base_lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0
    assert math.isclose(s(7), 0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert math.isclose(s(10), 0.1) and math.isclose(s(50), 0.1)


@pytest.mark.parametrize("kw", [dict(total_steps=0), dict(total_steps=5, warmup_steps=6)])
def test_bad_schedule_is_refused(kw) -> None:
    with pytest.raises(ConfigError, match="warmup_steps <= total_steps"):
        WarmupCosine(1.0, **kw)


def test_bad_layer_decay_is_refused(model) -> None:
    with pytest.raises(ConfigError, match=r"layer_decay must be in \(0, 1\], got 0.0"):
        param_groups(model, model.backbone, layer_decay=0.0)
    assert torch.is_tensor(next(model.parameters()))
