"""One Backbone interface over timm ViTs and open_clip visual towers.

Heads, MAE, MIL, token merging and explainability depend only on this contract:

- ``forward_features(x) -> tokens``  ``# [B, N, D_tok]``, prefix tokens (CLS, registers) first
- ``pool(tokens) -> embedding``       ``# [B, D]`` (the tower's own pooling and projection)
- ``embed_dim`` (D), ``token_dim`` (D_tok), ``patch_size``, ``num_prefix_tokens``, ``in_chans``, ``img_size``

Both adapters accept any input size: position embeddings are interpolated to the input's patch grid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loupe.core.errors import ConfigError, UnknownNameError

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """Base class of the adapters; subclasses set the attributes and implement the two methods."""

    embed_dim: int
    token_dim: int
    patch_size: int
    num_prefix_tokens: int
    in_chans: int
    img_size: tuple[int, int]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input batch ``x`` of shape [B, C, H, W]."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, first to last (used by layer-wise LR decay and attention hooks)."""
        raise NotImplementedError

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Patch embeddings with position embeddings, prefix tokens first, before the blocks.

        Returns ``(tokens, num_prefix)``: tokens ``# [B, num_prefix + gh*gw, D_tok]``. Used by MAE, which drops
        masked patch tokens here and runs `encode` on the visible ones only.
        """
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final norm over ``tokens`` from `embed_patches` (any subset)  # [B, n, D_tok]."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(
                f"input of shape {tuple(x.shape)} does not fit a backbone with in_chans={self.in_chans}; "
                f"expected [B, {self.in_chans}, H, W] (check the weight spec's input_size / channels)"
            )
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ConfigError(
                f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}; "
                f"resize to a multiple of {self.patch_size}"
            )


# ------------------------------------------------------------------------------------------------------------ timm
class TimmViTBackbone(Backbone):
    """A timm ``VisionTransformer`` (any ``vit_*``/``deit_*``/``eva*``-style model with patch_embed and blocks)."""

    def __init__(
        self,
        arch: str,
        *,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 224,
        drop_path_rate: float = 0.0,
        global_pool: str | None = None,
        **timm_kwargs: Any,
    ):
        super().__init__()
        import timm

        if not timm.is_model(arch):
            import difflib

            known = timm.list_models("vit_*")
            raise UnknownNameError("timm architecture", arch, known, difflib.get_close_matches(arch, known, n=3))
        kwargs: dict[str, Any] = dict(
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            img_size=img_size,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **timm_kwargs,
        )
        if global_pool is not None:
            kwargs["global_pool"] = global_pool
        try:
            self.model = timm.create_model(arch, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"timm model {arch!r} does not accept these options ({exc}); is it a ViT?") from None
        if not (hasattr(self.model, "patch_embed") and hasattr(self.model, "blocks")):
            raise ConfigError(f"timm model {arch!r} is not a vision transformer (no patch_embed/blocks); use a vit_*")
        self.arch = arch
        self.in_chans = in_chans
        self.img_size = tuple(self.model.patch_embed.img_size)  # type: ignore[assignment]
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.embed_dim = self.token_dim = int(self.model.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.model.forward_features(x)  # [B, N, D]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(tokens, pre_logits=True)  # [B, D]

    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with position embeddings and prefix tokens, before the blocks  # [B, N, D]."""
        x = self.model.patch_embed(x)
        return self.model._pos_embed(x)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.check_input(x)
        return self.patch_tokens(x), self.num_prefix_tokens  # [B, P + N, D]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm(m.blocks(m.norm_pre(tokens)))  # [B, n, D]


# ------------------------------------------------------------------------------------------------------- open_clip
def _open_clip_config(arch: str) -> tuple[str, dict[str, Any]]:
    """Resolve an open_clip model name or a path to a custom JSON config to (name, model_cfg)."""
    import open_clip

    p = Path(arch)
    if arch.endswith(".json"):
        if not p.is_file():
            raise ConfigError(f"open_clip config file {arch!r} does not exist; pass a JSON model config path")
        cfg = json.loads(p.read_text())
        cfg = cfg.get("model_cfg", cfg)  # HF-style open_clip_config.json wraps it
        if "vision_cfg" not in cfg or "embed_dim" not in cfg:
            raise ConfigError(f"{arch!r} is not an open_clip model config: it needs 'embed_dim' and 'vision_cfg'")
        return p.stem, cfg
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        import difflib

        known = open_clip.list_models()
        raise UnknownNameError("open_clip architecture", arch, known, difflib.get_close_matches(arch, known, n=3))
    return arch, cfg


def build_open_clip(arch: str, *, img_size: int | None = None) -> nn.Module:
    """Build a whole open_clip model (vision + text) with random weights from a name or JSON config path."""
    import copy

    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    _name, cfg = _open_clip_config(arch)
    cfg = copy.deepcopy(cfg)
    if img_size is not None:
        cfg["vision_cfg"]["image_size"] = img_size
    if cfg["text_cfg"].get("hf_model_name") or cfg.pop("custom_text", False):
        cfg["text_cfg"]["hf_model_pretrained"] = False
        return CustomTextCLIP(**cfg)
    cfg.pop("custom_text", None)
    _ = open_clip  # imported for its side effects on model configs
    return CLIP(**cfg)


class OpenClipVisualBackbone(Backbone):
    """The visual tower of an open_clip model (its own ViT, or a timm trunk through ``TimmModel``).

    Only the visual tower is held: a text tower that takes no part in the image forward would get no gradient and
    break DDP at its second step. Zero-shot heads get the text side separately (`load_open_clip_text`).
    """

    def __init__(self, arch: str, *, in_chans: int = 3, img_size: int | None = None, clip: nn.Module | None = None):
        super().__init__()
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if in_chans != 3:
            raise ConfigError(f"open_clip towers take 3-channel input, got in_chans={in_chans}; replicate grey to RGB")
        self.arch = arch
        self.visual = (clip if clip is not None else build_open_clip(arch, img_size=img_size)).visual
        v = self.visual
        self.in_chans = 3
        if isinstance(v, VisionTransformer):
            self._kind = "vit"
            self.patch_size = int(v.patch_size[0])
            self.img_size = tuple(v.image_size)  # type: ignore[assignment]
            self.num_prefix_tokens = 1
            self.token_dim = int(v.positional_embedding.shape[-1])
            self.embed_dim = int(v.output_dim)
        elif isinstance(v, TimmModel):
            self._kind = "timm"
            trunk = v.trunk
            self.patch_size = int(trunk.patch_embed.patch_size[0])
            self.img_size = tuple(trunk.patch_embed.img_size)  # type: ignore[assignment]
            self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
            self.token_dim = int(trunk.num_features)
            self.embed_dim = (
                int(v.head(torch.zeros(1, self.token_dim)).shape[-1])
                if len(list(v.head.children()))
                else self.token_dim
            )
        else:
            raise ConfigError(
                f"open_clip model {arch!r} has a {type(v).__name__} visual tower; Loupe backbones need a ViT tower"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        v = self.visual
        if self._kind == "timm":
            return v.trunk.forward_features(x)
        x = v.conv1(x)  # [B, W, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed(gh, gw).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)  # [B, N, W]
        if v.attn_pool is None and not v.final_ln_after_pool:
            x = v.ln_post(x)
        return x

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.check_input(x)
        v = self.visual
        if self._kind == "timm":
            return v.trunk._pos_embed(v.trunk.patch_embed(x)), self.num_prefix_tokens
        x = v.conv1(x)  # [B, W, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw).to(x.dtype), 1  # [B, 1 + N, W]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self._kind == "timm":
            t = v.trunk
            return t.norm(t.blocks(t.norm_pre(tokens)))
        x = v.transformer(v.ln_pre(tokens))  # [B, n, W]
        return v.ln_post(x) if v.attn_pool is None and not v.final_ln_after_pool else x

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        from timm.layers import resample_abs_pos_embed

        pos = self.visual.positional_embedding.unsqueeze(0)  # [1, 1+g*g, W]
        old = self.visual.grid_size
        if (gh, gw) == tuple(old):
            return pos
        return resample_abs_pos_embed(pos, [gh, gw], old_size=list(old), num_prefix_tokens=1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if self._kind == "timm":
            return v.head(v.trunk.forward_head(tokens, pre_logits=True))
        if v.attn_pool is None and not v.final_ln_after_pool:
            pooled, _ = v._global_pool(tokens)
        else:
            pooled, _ = v._pool(tokens)
        return pooled @ v.proj if v.proj is not None else pooled

    def blocks(self) -> nn.ModuleList:
        v = self.visual
        return v.trunk.blocks if self._kind == "timm" else v.transformer.resblocks


class OpenClipText(nn.Module):
    """The text side of an open_clip model: tokenize + encode to L2-normalised embeddings  # [T, D]."""

    def __init__(self, clip: nn.Module, arch: str):
        super().__init__()
        import open_clip

        self.clip = clip
        name, cfg = _open_clip_config(arch)
        ctx = int(cfg.get("text_cfg", {}).get("context_length", 77))
        hf_tok = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
        if hf_tok:
            self.tokenizer = open_clip.get_tokenizer(f"hf-hub:{hf_tok}" if "/" in hf_tok else name)
        else:
            self.tokenizer = open_clip.SimpleTokenizer(context_length=ctx)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts).to(next(self.clip.parameters()).device)
        return self.clip.encode_text(tokens, normalize=True)


def create_backbone(arch: str, **kwargs: Any) -> Backbone:
    """``timm:<arch>`` or ``open_clip:<name or config.json>`` → a Backbone with random weights."""
    family, sep, name = arch.partition(":")
    if not sep:
        raise ConfigError(
            f"backbone {arch!r} has no family prefix; write 'timm:{arch}' for a timm ViT or "
            f"'open_clip:{arch}' for an open_clip tower"
        )
    if family == "timm":
        return TimmViTBackbone(name, **kwargs)
    if family == "open_clip":
        kwargs.pop("drop_path_rate", None)
        return OpenClipVisualBackbone(name, **kwargs)
    raise ConfigError(f"backbone family {family!r} in {arch!r} is unknown; use 'timm:' or 'open_clip:'")
