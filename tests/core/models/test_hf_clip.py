"""A Hugging Face ``CLIPModel`` checkpoint (PLIP's format) loads into Loupe's open_clip towers with the same image
and text features the transformers implementation computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")


def _tiny_hf_clip(tmp_path: Path) -> tuple[torch.nn.Module, Path, Path]:
    vocab = 64
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu",
                         eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=3, hidden_act="quick_gelu"),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and class token, so a wrong mapping shows
        for name, p in hf.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ckpt = tmp_path / "plip.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, ckpt)
    from loupe.core.models.hf_clip import open_clip_config

    cfg_path = tmp_path / "tiny-hf-clip.json"
    cfg_path.write_text(json.dumps(open_clip_config(cfg.to_dict())))
    return hf, ckpt, cfg_path


def _register(cfg_path: Path) -> str:
    from loupe.core.models.classifier import register_vit
    from loupe.core.registry import MODELS

    name = f"test_hf_clip_{abs(hash(str(cfg_path)))}"
    if name not in MODELS:
        register_vit(name, f"open_clip:{cfg_path}")
    return name


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_image_features_match_transformers(tmp_path: Path) -> None:
    from loupe.core.models.classifier import build_model
    from loupe.core.models.spec import WeightSpec

    hf, ckpt, cfg_path = _tiny_hf_clip(tmp_path)
    spec = WeightSpec(name="plip-tiny", architecture=_register(cfg_path), task="embedding", input_size=(3, 32, 32),
                      label_names=(), source=f"file:{ckpt}", layout="hf-clip")  # fmt: skip
    model, report = build_model(spec)
    assert "renamed" in report.summary()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval().embed(x)
        theirs = _features(hf.get_image_features(pixel_values=x))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_text_features_match_transformers(tmp_path: Path) -> None:
    from loupe.core.models.classifier import load_open_clip_text

    hf, ckpt, cfg_path = _tiny_hf_clip(tmp_path)
    text = load_open_clip_text(str(cfg_path), f"file:{ckpt}")
    ids = torch.tensor([[62, 5, 9, 17, 63, 0, 0, 0, 0, 0, 0, 0], [62, 33, 41, 2, 8, 12, 63, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ours = text.clip.encode_text(ids)
        theirs = _features(hf.get_text_features(input_ids=ids))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_an_open_clip_checkpoint_is_refused_as_hf_clip(tmp_path: Path) -> None:
    from loupe.core.errors import WeightsMismatchError
    from loupe.core.models.classifier import build_model
    from loupe.core.models.spec import WeightSpec

    _, _, cfg_path = _tiny_hf_clip(tmp_path)
    bogus = tmp_path / "other.safetensors"
    save_file({"visual.proj": torch.zeros(48, 16)}, bogus)
    spec = WeightSpec(name="x", architecture=_register(cfg_path), task="embedding", input_size=(3, 32, 32),
                      label_names=(), source=f"file:{bogus}", layout="hf-clip")  # fmt: skip
    with pytest.raises(WeightsMismatchError, match="not a Hugging Face CLIPModel"):
        build_model(spec)
