"""Heads beyond the linear classifier, each over the Backbone contract only, and the named-outputs protocol.

A model's ``forward_outputs(x)`` returns named tensors (the spec's ``outputs`` say which a model has):

- ``logits``       ``# [B, K]`` label logits (``scores`` are their sigmoid / softmax)
- ``embedding``    ``# [B, D]`` the pooled embedding
- ``mask_logits``  ``# [B, 1, H, W]`` per-pixel logits at the input's resolution (``mask`` output)

and a model with an attention-MIL head also ``aggregate_units(embeddings [N, D]) -> {"logits": [K],
"attention": [N]}``: the file's logits from all its units, and each unit's attention weight (sums to 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loupe.core.models.backbones import Backbone


def model_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named outputs of ``model`` on ``x``; a plain module's output is taken as ``logits``."""
    forward = getattr(model, "forward_outputs", None)
    return forward(x) if forward is not None else {"logits": model(x)}


def to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits ``[..., K]`` → probabilities: softmax for multiclass, sigmoid for multilabel / binary."""
    logits = logits.float()
    return logits.softmax(-1) if task == "multiclass" else logits.sigmoid()


class PatchMaskHead(nn.Module):
    """Per-pixel logits from the patch tokens: a linear map per token, upsampled (bilinear) to the input size.

    The simplest localisation head that respects the Backbone contract; domains with stronger needs (multi-scale
    features, edge supervision) build theirs on the same tokens.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.prefix, self.patch = int(backbone.num_prefix_tokens), int(backbone.patch_size)
        self.proj = nn.Linear(backbone.token_dim, 1)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        gh, gw = size[0] // self.patch, size[1] // self.patch
        x = self.proj(tokens[:, self.prefix :])  # [B, gh*gw, 1]
        x = x.transpose(1, 2).reshape(x.shape[0], 1, gh, gw)  # [B, 1, gh, gw]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # [B, 1, H, W]


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, ABMIL): unit embeddings → one bag embedding → logits."""

    def __init__(self, dim: int, num_outputs: int, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.v, self.u = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_outputs)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.w(self.drop(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))))[:, 0]  # [N]
        a = a.softmax(0)
        bag = (a[:, None] * h).sum(0)  # [D]
        return {"logits": self.classifier(bag), "attention": a}

    def instance_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Each unit scored as a bag of its own (attention 1)  # [N, K]."""
        return self.classifier(h)


class TransformerMIL(nn.Module):
    """A small transformer over unit embeddings (TransMIL-style, without its positional convolution: units of a
    slide or video are a set), pooled by attention to a learned score: the logits of the bag, and the pooling
    weights as each unit's attention."""

    def __init__(self, dim: int, num_outputs: int, hidden: int = 128, depth: int = 2, heads: int = 4,
                 dropout: float = 0.1):  # fmt: skip
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, hidden * 2, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.score, self.norm = nn.Linear(hidden, 1), nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_outputs)

    def _bags(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(self.proj(x))  # [B, N, hidden]
        a = self.score(z)[..., 0].softmax(-1)  # [B, N]
        return {"logits": self.classifier(self.norm((a[..., None] * z).sum(1))), "attention": a}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._bags(h[None])
        return {"logits": out["logits"][0], "attention": out["attention"][0]}

    def instance_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._bags(h[:, None])["logits"]  # [N, K]: N bags of one unit


MIL_HEADS = {"gated": GatedAttentionMIL, "transformer": TransformerMIL}


def aggregate_scores(scores: torch.Tensor, method: str) -> torch.Tensor:
    """Unit scores ``[N, K]`` → the file's ``[K]``: ``mean``, ``max`` or ``topk:K`` (mean of each label's K highest
    unit scores; all of them when a file has fewer). ``attention`` needs the model (`aggregate_units`)."""
    if method == "mean":
        return scores.mean(0)
    if method == "max":
        return scores.max(0).values
    if method.startswith("topk:"):
        k = min(int(method.removeprefix("topk:")), scores.shape[0])
        return scores.topk(k, dim=0).values.mean(0)
    raise ValueError(f"aggregation {method!r} cannot be computed from scores alone")
