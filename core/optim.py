"""Optimiser parameter groups with layer-wise LR decay, and a warm-up + cosine schedule.

Layer-wise decay (BEiT / MAE fine-tuning): with L transformer blocks, the embeddings are layer 0, block i is layer
i + 1, and everything after the blocks (final norm, head) is layer L + 1. A parameter at layer l trains at
``lr * layer_decay ** (L + 1 - l)``, so the head gets the full LR and the patch embedding the smallest.
Biases, norms and position / class tokens get no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.backbones import Backbone

# Parameter names (suffixes of the backbone's own names) that sit before the first block.
_EMBED_NAMES = (
    "pos_embed",
    "cls_token",
    "reg_token",
    "patch_embed",
    "norm_pre",
    "conv1",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
)
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "class_embedding", "positional_embedding", "mask_token")


def layer_ids(model: nn.Module, backbone: Backbone) -> dict[str, int]:
    """Layer index (0 .. L + 1) of every trainable parameter of ``model``, which contains ``backbone``."""
    blocks = backbone.blocks()
    num_layers = len(blocks)
    block_of = {id(p): i + 1 for i, blk in enumerate(blocks) for p in blk.parameters()}
    backbone_params = {id(p) for p in backbone.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in block_of:
            out[name] = block_of[id(p)]
        elif id(p) in backbone_params and any(k in name.split(".") or name.endswith(k) for k in _EMBED_NAMES):
            out[name] = 0
        else:
            out[name] = num_layers + 1
    return out


def param_groups(
    model: nn.Module, backbone: Backbone, *, weight_decay: float = 0.05, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW parameter groups; each carries ``lr_scale`` (applied by `WarmupCosine`) and its ``layer``."""
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}; 1.0 switches it off")
    ids = layer_ids(model, backbone)
    top = len(backbone.blocks()) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if name not in ids:
            continue
        no_decay = p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES)
        key = (ids[name], no_decay)
        g = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "layer": ids[name],
                "lr_scale": layer_decay ** (top - ids[name]),
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine down to ``min_lr`` at ``total_steps``."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ConfigError(
                f"schedule needs 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR to ``lr(step) * group['lr_scale']``; returns the unscaled LR."""
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over `param_groups` (the ``names``/``layer`` bookkeeping keys are kept for inspection)."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser section of a fine-tuning recipe: AdamW LR, weight decay, layer-wise LR decay (1 = off), warm-up
    (epochs) and the cosine floor."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 2.0
    min_lr: float = 1e-6
    beta2: float = 0.999

    def problems(self) -> list[str]:
        out = []
        if self.lr <= 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.layer_decay <= 1.0:
            out.append(f"layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.warmup_epochs < 0:
            out.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        return out
