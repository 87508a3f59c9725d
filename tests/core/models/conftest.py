from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loupe.core.models import register_vit
from loupe.core.registry import MODELS

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session", autouse=True)
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Register a tiny timm ViT and a tiny open_clip model (custom JSON config) for the whole session."""
    cfg_path = tmp_path_factory.mktemp("clipcfg") / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    if "test_vit_nano" not in MODELS:
        register_vit("test_vit_nano", "timm:vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=2, num_heads=2)
        register_vit("test_clip_nano", f"open_clip:{cfg_path}")
    return {"vit": "test_vit_nano", "clip": "test_clip_nano", "clip_cfg": str(cfg_path)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def clip_cfg(tiny_models: dict[str, str]) -> Path:
    return Path(MODELS.entry("test_clip_nano").meta["backbone"].removeprefix("open_clip:"))
