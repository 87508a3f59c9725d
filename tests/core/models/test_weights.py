from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from loupe.core.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError
from loupe.core.models import WeightSpec, build_model, load_model_dir, load_open_clip_text, save_model
from loupe.core.models.backbones import build_open_clip
from loupe.core.registry import MODELS

NANO = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def _timm_nano(in_chans: int = 3, img_size: int = 32, **kw) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, in_chans=in_chans, img_size=img_size, **NANO, **kw
    ).eval()


def _spec(source: str | None, layout: str, arch: str = "test_vit_nano", c: int = 3, size: int = 32, **kw) -> WeightSpec:
    return WeightSpec(
        name="t",
        architecture=arch,
        source=source,
        layout=layout,
        input_size=(c, size, size),
        mean=(0.5,) * c,
        std=(0.25,) * c,
        label_names=("a", "b"),
        **kw,
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    ref = _timm_nano(num_classes=7)
    path = tmp_path / f"vit{suffix}"
    sd = ref.state_dict()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    model, report = build_model(_spec(f"file:{path}", "timm"))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model.embed(x), expected)
    assert report is not None and report.missing == ["head.weight", "head.bias"]
    assert set(report.unexpected) == {"backbone.model.head.weight", "backbone.model.head.bias"}


@pytest.mark.parametrize("wrapped", [True, False])
def test_open_clip_checkpoint_round_trip(tmp_path: Path, wrapped: bool) -> None:
    cfg = MODELS.entry("test_clip_nano").meta["backbone"]
    ref = build_open_clip(cfg.removeprefix("open_clip:")).eval()
    sd = ref.state_dict()
    if wrapped:  # open_clip training checkpoints: {"epoch", "state_dict": {"module.<key>"}}
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    spec = _spec(f"file:{path}", "open_clip", arch="test_clip_nano").replace(task="embedding", label_names=())
    model, report = build_model(spec)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.embed(x), ref.encode_image(x))
    assert "text-tower keys dropped" in report.summary() and "visual.conv1.weight" not in report.unexpected
    text = load_open_clip_text(cfg, f"file:{path}")  # the text side, for zero-shot heads, from the same file
    tokens = torch.randint(0, 1000, (2, 16))
    torch.testing.assert_close(text.clip.encode_text(tokens), ref.encode_text(tokens))


def _mae_checkpoint(path: Path, enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in enc.state_dict().items() if not k.startswith("head")}
    decoder = {
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.randn(16, 32),
        "decoder_pos_embed": torch.randn(1, 17, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(8 * 8 * 3, 16),
    }
    torch.save({"model": {**sd, **decoder}, "epoch": 799}, path)
    return sd


def test_mae_checkpoint_same_shape_gives_exact_encoder(tmp_path: Path) -> None:
    enc = _timm_nano(num_classes=0)
    sd = _mae_checkpoint(tmp_path / "checkpoint-799.pth", enc)
    model, report = build_model(_spec(f"file:{tmp_path / 'checkpoint-799.pth'}", "mae"))
    loaded = model.backbone.model.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert "decoder_embed.weight" in report.unexpected and "mask_token" in report.unexpected
    assert any("dropped 5 decoder" in c for c in report.conversions)


def test_mae_checkpoint_converts_channels_and_resizes_positions(tmp_path: Path) -> None:
    enc = _timm_nano(num_classes=0, img_size=32)
    sd = _mae_checkpoint(tmp_path / "mae.pth", enc)
    model, report = build_model(_spec(f"file:{tmp_path / 'mae.pth'}", "mae", c=1, size=48))
    inner = model.backbone.model.state_dict()
    torch.testing.assert_close(inner["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert inner["pos_embed"].shape == (1, 1 + 36, 32)
    torch.testing.assert_close(inner["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # class token position kept
    torch.testing.assert_close(inner["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    assert any("3→1 input channels" in c for c in report.conversions)
    assert any("pos_embed: resampled" in c for c in report.conversions)


def test_loupe_model_dir_round_trip(tmp_path: Path) -> None:
    spec = _spec(None, "loupe", thresholds={"a": 0.3})
    model, _ = build_model(spec)
    model.eval()
    save_model(model, spec, tmp_path / "m")
    loaded, spec2 = load_model_dir(tmp_path / "m")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert spec2.thresholds == {"a": 0.3} and spec2.label_names == ("a", "b")


def test_missing_file_and_bad_prefix_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError, match=r"does not exist; place the weights there"):
        build_model(_spec(f"file:{tmp_path / 'nope.safetensors'}", "timm"))
    with pytest.raises(WeightsNotFoundError) as err:
        build_model(_spec("tag:cxr_demo", "loupe"))
    assert str(tmp_path / "cache" / "cxr_demo" / "weights.safetensors") in str(err.value)
    assert "loupe weights fetch tag:cxr_demo" in str(err.value)
    with pytest.raises(ConfigError, match=r"write file:/some/where.pt"):
        build_model(_spec("/some/where.pt", "timm"))


def test_hf_hub_offline_names_the_cache_and_the_fetch_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as err:
        build_model(_spec("hf-hub:someorg/cxr-vit", "timm"))
    msg = str(err.value)
    assert "models--someorg--cxr-vit" in msg and "loupe weights fetch hf-hub:someorg/cxr-vit" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": _timm_nano().state_dict(), "extra": _Evil()}, path)
    with pytest.raises(WeightsMismatchError, match="refusing to load"):
        build_model(_spec(f"file:{path}", "timm"))


def test_wrong_architecture_lists_the_mismatches(tmp_path: Path) -> None:
    other = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2
    )
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(.*file \(48,\).*model \(32,\)"):
        build_model(_spec(f"file:{tmp_path / 'w.safetensors'}", "timm"))
    sd = {k: v for k, v in _timm_nano().state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"keys the model needs are missing \(backbone.model.blocks.1"):
        build_model(_spec(f"file:{tmp_path / 'partial.safetensors'}", "timm"))


def test_open_clip_model_folder_of_the_old_layout_still_loads(tmp_path: Path) -> None:
    """Folders saved while the backbone held the whole CLIP (keys backbone.clip.visual.*) load into the tower."""
    spec = _spec(None, "loupe", arch="test_clip_nano").replace(task="embedding", label_names=())
    model, _ = build_model(spec)
    folder = save_model(model.eval(), spec, tmp_path / "m")
    sd = {k.replace("backbone.visual.", "backbone.clip.visual.", 1): v for k, v in model.state_dict().items()}
    sd["backbone.clip.token_embedding.weight"] = torch.zeros(8, 4)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "weights.safetensors"))
    WeightSpec.load(folder / "weight_spec.json").replace(weights_sha256=None).save(folder / "weight_spec.json")  # old
    loaded, _ = load_model_dir(folder)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.embed(x), model.embed(x))


@pytest.mark.parametrize("layout", ["timm", "mae"])
def test_positions_resample_when_prefix_tokens_carry_none(tmp_path: Path, layout: str) -> None:
    """DeiT-3 / register-token ViTs (no_embed_class): the position table covers patches only, so all of it is grid."""
    from timm.layers import resample_abs_pos_embed

    from loupe.core.models import register_vit

    kw = dict(reg_tokens=4, no_embed_class=True)
    if "test_vit_nano_reg" not in MODELS:
        register_vit("test_vit_nano_reg", "timm:vit_tiny_patch16_224", **NANO, **kw)
    ref = _timm_nano(num_classes=0, img_size=32, **kw)
    assert ref.num_prefix_tokens == 5 and ref.pos_embed.shape == (1, 16, 32)
    sd = _mae_checkpoint(tmp_path / "w.pth", ref) if layout == "mae" else ref.state_dict()
    if layout == "timm":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    path = tmp_path / ("w.pth" if layout == "mae" else "w.safetensors")
    model, report = build_model(_spec(f"file:{path}", layout, arch="test_vit_nano_reg", size=64))
    expected = resample_abs_pos_embed(sd["pos_embed"], [8, 8], num_prefix_tokens=0)
    torch.testing.assert_close(model.backbone.model.pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert any("pos_embed" in c for c in report.conversions)
