"""Masked autoencoder (He et al., 2022) over any `Backbone`, for any number of input channels.

The encoder is the Backbone itself: `Backbone.embed_patches` gives position-embedded tokens, the masked patch
tokens are dropped, and `Backbone.encode` runs the blocks on the prefix + visible tokens only. A light decoder
(its own width and depth) sees every position: the encoded visible tokens plus a shared mask token, with fixed
2-D sin-cos position embeddings computed for the input's grid. The loss is the mean squared error on the masked
patches, optionally against per-patch normalised pixels (``norm_pix_loss``, the paper's default).

`mae_state_dict` writes the published MAE layout (timm encoder keys + ``decoder_*`` / ``mask_token``), so our
checkpoints load through the same ``layout: mae`` path as facebook's and the medical-MAE release.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.backbones import Backbone, TimmViTBackbone


@dataclass(frozen=True)
class MAEConfig:
    """Decoder shape and masking. ``mask_ratio`` is the fraction of patches hidden from the encoder."""

    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.mask_ratio < 1.0:
            out.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_dim < 1 or self.decoder_depth < 1 or self.decoder_heads < 1:
            out.append(f"decoder_dim/depth/heads must be >= 1, got {self.decoder_dim}/{self.decoder_depth}/...")
        elif self.decoder_dim % self.decoder_heads:
            out.append(f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads ({self.decoder_heads})")
        return out


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE reference)  # [gh*gw, dim]; ``dim`` must be divisible by 4."""
    if dim % 4:
        raise ConfigError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # [D/4]
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    out = []
    for pos in (xs.reshape(-1), ys.reshape(-1)):
        ang = pos[:, None] * omega[None]  # [N, D/4]
        out += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(out, dim=1).float()  # [N, D]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, N, p*p*C]`` in row-major patch order (pixel-major, channel-minor as in MAE)."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh, p, gw, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: ``[B, N, p*p*C]`` → ``[B, C, gh*p, gw*p]``."""
    gh, gw = grid
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)


def random_masking(n: int, num_keep: int, batch: int, device: torch.device, generator=None):
    """Per-sample random subset of ``num_keep`` of ``n`` patches.

    Returns ``(ids_keep [B, keep], ids_restore [B, N], mask [B, N])`` with mask 1 = hidden, in original order.
    """
    noise = torch.rand(batch, n, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones(batch, n, device=device)
    mask[:, :num_keep] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


class MaskedAutoencoder(nn.Module):
    """MAE with ``backbone`` as the encoder. ``forward(x) -> (loss, pred [B, N, p*p*C], mask [B, N])``."""

    def __init__(self, backbone: Backbone, cfg: MAEConfig = MAEConfig()):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ConfigError(problems, source="MAE config")
        from timm.models.vision_transformer import Block

        self.backbone, self.cfg = backbone, cfg
        d = cfg.decoder_dim
        self.decoder_embed = nn.Linear(backbone.token_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_blocks = nn.ModuleList(
            Block(d, cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, backbone.patch_size**2 * backbone.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, generator=None):
        """Encode the visible patches only. Returns ``(latent [B, P + keep, D], mask [B, N], ids_restore [B, N])``."""
        tokens, n_prefix = self.backbone.embed_patches(x)  # [B, P + N, D]
        prefix, patches = tokens[:, :n_prefix], tokens[:, n_prefix:]
        b, n, d = patches.shape
        keep = max(1, int(round(n * (1.0 - mask_ratio))))
        ids_keep, ids_restore, mask = random_masking(n, keep, b, x.device, generator)
        visible = torch.gather(patches, 1, ids_keep[..., None].expand(-1, -1, d))  # [B, keep, D]
        latent = self.backbone.encode(torch.cat([prefix, visible], dim=1))  # [B, P + keep, D]
        return latent, mask, ids_restore, n_prefix

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor, n_prefix: int, grid) -> torch.Tensor:
        """Predict every patch's pixels  # [B, N, p*p*C]."""
        x = self.decoder_embed(latent)  # [B, P + keep, d]
        b, n = ids_restore.shape
        vis = x[:, n_prefix:]
        fill = self.mask_token.expand(b, n - vis.shape[1], -1)
        full = torch.cat([vis, fill], dim=1)  # [B, N, d] in shuffled order
        full = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # original order
        full = full + sincos_pos_embed(x.shape[-1], grid).to(full)
        x = torch.cat([x[:, :n_prefix], full], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, n_prefix:]

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (all patches when nothing is masked)."""
        target = patchify(x, self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)  # [B, N]
        if mask.sum() == 0:
            return per_patch.mean()
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, x: torch.Tensor, mask_ratio: float | None = None, generator=None):
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore, n_prefix = self.forward_encoder(x, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore, n_prefix, self.backbone.grid_size(x))
        return self.loss(x, pred, mask), pred, mask

    def mae_state_dict(self) -> dict[str, torch.Tensor]:
        """The published MAE layout: timm encoder keys at the top level, ``decoder_*`` and ``mask_token`` beside."""
        if not isinstance(self.backbone, TimmViTBackbone):
            raise ConfigError("the published MAE layout needs a timm backbone; save the state_dict() instead")
        enc = {k: v for k, v in self.backbone.model.state_dict().items() if not k.startswith("head")}
        dec = {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        return {k: v.detach().contiguous().cpu() for k, v in {**enc, **dec}.items()}
