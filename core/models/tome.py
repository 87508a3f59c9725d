"""Token merging (ToMe, Bolya et al., ICLR 2023) on the project's ViT backbones, at inference and in fine-tuning.

In each block, after attention, ``r`` patch tokens are merged into their most similar partner by bipartite soft
matching: patch tokens alternate between two sets A and B, each A token's best match in B is found by the cosine
similarity of the attention keys (averaged over heads), and the ``r`` best-matched A tokens are averaged into their
partners. Every token carries its **size** (how many patches it stands for): merges are size-weighted averages,
attention adds ``log(size)`` to the logits (proportional attention, so a merged token counts as the patches it
holds), and an average-pooling tower pools with size weights. Prefix tokens (CLS, registers) are never merged.

Merging never touches the model's weights or its state-dict keys: `merging_view` returns a shallow copy of a
classifier whose backbone merges (parameters shared with the original); `apply_token_merging` installs merging on
a backbone in place (fine-tuning with merging, as ToMe trains). Only ``forward_features`` merges: ``patch_tokens``,
``embed_patches`` / ``encode`` (MAE) and the other backbone methods keep every token. Models that need a token
per patch refuse merging (`merging_problems`): a ``mask`` head reshapes tokens to the patch grid; an attention-MIL
head's unit embeddings were learned from unmerged tiles. Grad-CAM runs on the full-token model
(`loupe.core.models.inference.InferenceModel.base`).

Supported blocks: timm ``Block`` with ``Attention`` (every ``vit_*`` / ``deit_*``), open_clip
``ResidualAttentionBlock`` (``nn.MultiheadAttention``); pooling: class token or average.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from loupe.core.errors import ConfigError

Schedule = Literal["constant", "decreasing"]


@dataclass(frozen=True)
class ToMeConfig:
    """How many tokens each block removes.

    ``r``: tokens merged away per block (an int), or one value per block (a tuple, first block first).
    ``schedule`` (int ``r`` only): ``constant`` (r in every block) or ``decreasing`` (2r in the first block down to
    0 in the last, the same total: ToMe's inflection -1 schedule, which keeps more tokens where they are cheap).
    ``prop_attn``: proportional attention (``log(size)`` added to the attention logits).
    """

    r: int | tuple[int, ...] = 8
    schedule: Schedule = "constant"
    prop_attn: bool = True

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="token merging")

    def problems(self) -> list[str]:
        out = []
        values = self.r if isinstance(self.r, tuple) else (self.r,)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4096 for v in values):
            out.append(f"r must be a whole number of tokens in [0, 4096] or a list of them per block, got {self.r!r}")
        if self.schedule not in ("constant", "decreasing"):
            out.append(f"schedule must be 'constant' or 'decreasing', got {self.schedule!r}")
        if isinstance(self.r, tuple) and self.schedule != "constant":
            out.append("a per-block list of r is its own schedule; leave schedule at 'constant'")
        return out

    def per_block(self, depth: int) -> list[int]:
        """Tokens to merge away in each of ``depth`` blocks (before clamping to half the patch tokens)."""
        if isinstance(self.r, tuple):
            if len(self.r) != depth:
                raise ConfigError(f"token merging r lists {len(self.r)} values but the backbone has {depth} blocks; "
                                  f"give one value per block or a single r")  # fmt: skip
            return list(self.r)
        if self.schedule == "constant" or depth == 1:
            return [self.r] * depth
        step = 2.0 * self.r / (depth - 1)
        return [int(round(2 * self.r - step * i)) for i in range(depth)]

    @property
    def label(self) -> str:
        """Short name used in inference modes: ``tome8``, ``tome8d`` (decreasing) or ``tome[4,4,...]``."""
        if isinstance(self.r, tuple):
            return "tome[" + ",".join(str(v) for v in self.r) + "]"
        return f"tome{self.r}" + ("d" if self.schedule == "decreasing" else "")


def tokens_per_block(cfg: ToMeConfig, n_patches: int, depth: int) -> list[int]:
    """Patch tokens entering each block when ``cfg`` merges (each merge is clamped to half the tokens)."""
    out, n = [], n_patches
    for r in cfg.per_block(depth):
        out.append(n)
        n -= min(r, n // 2)
    return out


# ---------------------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class Matching:
    """The outcome of one bipartite matching over ``[B, N, C]`` patch tokens (A = even, B = odd positions)."""

    unmerged: torch.Tensor  # [B, Na - r, 1] A tokens kept
    src: torch.Tensor  # [B, r, 1] A tokens merged away
    dst: torch.Tensor  # [B, r, 1] their partners in B
    r: int

    def merge(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """``[B, N, C]`` → ``[B, N - r, C]``: kept A tokens, then B tokens with their merged A tokens reduced in."""
        a, b = x[:, ::2], x[:, 1::2]  # [B, Na, C], [B, Nb, C]
        n, na, c = a.shape
        kept = a.gather(1, self.unmerged.expand(n, na - self.r, c))
        moved = a.gather(1, self.src.expand(n, self.r, c))
        b = b.scatter_reduce(1, self.dst.expand(n, self.r, c), moved, reduce=reduce)
        return torch.cat([kept, b], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """Match ``r`` A tokens to their most similar B tokens by the cosine of ``metric``  # [B, N, C]."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # [B, Na, Nb]
    best, partner = scores.max(dim=-1)  # [B, Na]
    order = best.argsort(dim=-1, descending=True)[..., None]  # [B, Na, 1]
    src = order[:, :r]
    return Matching(unmerged=order[:, r:], src=src, dst=partner[..., None].gather(1, src), r=r)


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor | None, metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge ``r`` of the patch tokens of ``x`` ``[B, N, D]`` (prefix tokens kept first, unmerged) by the keys
    ``metric`` ``[B, N, C]``, as size-weighted averages. Returns the new tokens and sizes ``[B, N - r, 1]``."""
    b, n, _ = x.shape
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return x, size
    if size is None:
        size = torch.ones(b, n, 1, dtype=torch.float32, device=x.device)
    m = bipartite_soft_matching(metric[:, prefix:], r)
    s = size[:, prefix:]
    merged_size = m.merge(s)
    merged = m.merge(x[:, prefix:].float() * s) / merged_size  # [B, N - P - r, D]
    return torch.cat([x[:, :prefix], merged.to(x.dtype)], 1), torch.cat([size[:, :prefix], merged_size], 1)


def _bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Proportional attention: ``log(size)`` on every query's logits  # [B, 1, 1, N]."""
    return None if size is None else size.log()[:, None, None, :, 0].to(dtype)


# ------------------------------------------------------------------------------------------------------ blocks
def _timm_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` with an additive bias; returns (output ``[B, N, D]``, keys averaged over heads)."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_cast(bias, q), dropout_p=drop)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.mean(1)


def _mha_attention(attn: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor | None):
    """``nn.MultiheadAttention`` (batch first) with an additive bias; (output, keys averaged over heads)."""
    b, n, d = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd]
    drop = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_cast(bias, q), dropout_p=drop)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d)), k.mean(1)


def _cast(bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(q.dtype)


def _timm_block(blk: nn.Module, x, size, r: int, prefix: int, prop: bool):
    h, metric = _timm_attention(blk.attn, blk.norm1(x), _bias(size, x.dtype) if prop else None)
    x = x + blk.drop_path1(blk.ls1(h))
    x, size = merge_tokens(x, size, metric, r, prefix)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), size


def _clip_block(blk: nn.Module, x, size, r: int, prefix: int, prop: bool):
    h, metric = _mha_attention(blk.attn, blk.ln_1(x), _bias(size, x.dtype) if prop else None)
    x = x + blk.ls_1(h)
    x, size = merge_tokens(x, size, metric, r, prefix)
    return x + blk.ls_2(blk.mlp(blk.ln_2(x))), size


# -------------------------------------------------------------------------------------------- backbone forward
class MergingForward:
    """``forward_features`` of a backbone with token merging (installed on the instance; see the module)."""

    def __init__(self, backbone: nn.Module, cfg: ToMeConfig):
        self.backbone, self.cfg = backbone, cfg
        self.kind, self.tower = _tower(backbone)
        self.prefix = int(backbone.num_prefix_tokens)
        self.rs = cfg.per_block(len(backbone.blocks()))
        self.avg_pool = _pools_by_average(self.kind, self.tower)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens, size = self.tokens_and_sizes(x)
        return tokens if size is None or not self.avg_pool else self._weight_for_mean(tokens, size)

    def tokens_and_sizes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merged output tokens ``[B, N', D]`` and their sizes ``[B, N', 1]`` (None if nothing merged)."""
        self.backbone.check_input(x)
        t, prop = self.tower, self.cfg.prop_attn
        if self.kind == "clip":
            tokens, _ = self.backbone.embed_patches(x)
            x = t.ln_pre(t.patch_dropout(tokens))
        else:
            x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
        size = None
        block = _clip_block if self.kind == "clip" else _timm_block
        for blk, r in zip(self.backbone.blocks(), self.rs, strict=True):
            x, size = block(blk, x, size, r, self.prefix, prop)
        if self.kind == "clip":
            return (t.ln_post(x) if t.attn_pool is None and not t.final_ln_after_pool else x), size
        return t.norm(x), size

    def _weight_for_mean(self, tokens: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """Scale the pooled tokens by ``size * n / sum(size)``: the tower's own mean pooling then returns the
        size-weighted mean (each merged token counts as the patches it holds)."""
        start = 0 if getattr(self.tower, "pool_include_prefix", False) else self.prefix
        s = size[:, start:]  # [B, n, 1]
        w = (s * s.shape[1] / s.sum(1, keepdim=True)).to(tokens.dtype)
        return torch.cat([tokens[:, :start], tokens[:, start:] * w], dim=1)


def _tower(backbone: nn.Module) -> tuple[str, nn.Module]:
    """("timm" | "clip", the module holding patch embedding, blocks and norms) or a clear refusal."""
    from loupe.core.models.backbones import OpenClipVisualBackbone, TimmViTBackbone

    if isinstance(backbone, TimmViTBackbone):
        return "timm", backbone.model
    if isinstance(backbone, OpenClipVisualBackbone):
        return ("timm", backbone.visual.trunk) if backbone._kind == "timm" else ("clip", backbone.visual)
    raise ConfigError(f"token merging supports the timm and open_clip ViT backbones, not {type(backbone).__name__}")


def _pools_by_average(kind: str, tower: nn.Module) -> bool:
    """Whether the tower mean-pools tokens (then merged tokens are weighted by size); refuse other poolings."""
    if getattr(tower, "attn_pool", None) is not None:
        raise ConfigError("token merging cannot run under an attention-pooling head (it attends over every patch "
                          "token unweighted); score this model without merging")  # fmt: skip
    pool = getattr(tower, "pool_type", None) if kind == "clip" else getattr(tower, "global_pool", None)
    if pool in ("token", "tok"):
        return False
    if pool == "avg":
        return True
    raise ConfigError(f"token merging needs class-token or average pooling; this tower pools with {pool!r}")


def _block_problems(backbone: nn.Module) -> list[str]:
    kind, tower = _tower(backbone)
    need = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    attn_need = ("qkv", "q_norm", "k_norm", "norm", "proj", "num_heads", "head_dim")
    if kind == "clip":
        need, attn_need = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2"), ("in_proj_weight", "out_proj")
    out = []
    for i, blk in enumerate(backbone.blocks()):
        attn = getattr(blk, "attn", None)
        missing = [n for n in need if not hasattr(blk, n)] + [n for n in attn_need if not hasattr(attn, n)]
        if kind == "clip" and hasattr(blk, "ln_1_kv"):
            missing.append("(cross attention)")
        if isinstance(attn, nn.MultiheadAttention) and not (attn.batch_first and attn._qkv_same_embed_dim):
            missing.append("(batch-first joint q/k/v projection)")
        if missing:
            out.append(f"block {i} ({type(blk).__name__}) lacks {', '.join(missing)}: token merging supports timm "
                       f"Block/Attention and open_clip ResidualAttentionBlock")  # fmt: skip
            break
    if kind == "timm":
        out += [f"timm tower lacks {n}" for n in ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "norm")
                if not hasattr(tower, n)]  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ public API
def merging_problems(model: nn.Module) -> list[str]:
    """Why token merging cannot run on ``model`` (a classifier or a bare backbone); empty when it can."""
    from loupe.core.models.classifier import MaskClassifier, MILClassifier

    if isinstance(model, MaskClassifier) or hasattr(model, "mask_head"):
        return ["the model has a mask output, which needs one token per patch; it is scored without token merging"]
    if isinstance(model, MILClassifier):
        return ["the model's attention-MIL head was trained on embeddings of unmerged tiles; score it without "
                "token merging (or fine-tune it with merging)"]  # fmt: skip
    backbone = getattr(model, "backbone", model)
    try:
        problems = _block_problems(backbone)
        _pools_by_average(*_tower(backbone))
    except ConfigError as exc:
        return [str(exc)]
    return problems


def apply_token_merging(backbone: nn.Module, cfg: ToMeConfig) -> nn.Module:
    """Make ``backbone`` (in place) merge tokens in ``forward_features``; for fine-tuning with merging. Returns it.
    Weights and state-dict keys are unchanged; `remove_token_merging` undoes it."""
    problems = merging_problems(backbone)
    if problems:
        raise ConfigError(problems, source="token merging")
    backbone.forward_features = MergingForward(backbone, cfg)  # an instance attribute: the class is untouched
    return backbone


def fine_tune_with_merging(model: nn.Module, spec: Any, text: str) -> Any:
    """Fine-tune classifier ``model`` with token merging ``text`` (``tome8``, ``tome8d``, ``tome[8,8,4,...]``; ''
    for none), as ToMe trains to recover the accuracy merging costs off the shelf. Merging is installed in place;
    the returned `WeightSpec` stores it (``inference.tome_r``, one value per block for a schedule) and makes
    ``tome`` the model's default inference mode, unless the spec already names one, so scoring runs the model the
    way it was trained (``--mode fp32`` still runs every token). Refused, clearly, for mask and MIL models."""
    if not text:
        return spec
    cfg = parse_tome(text)
    problems = merging_problems(model)
    if problems:
        raise ConfigError(problems, source=f"token merging during fine-tuning ({text})")
    depth = len(model.backbone.blocks())
    r: int | list[int] = cfg.r if isinstance(cfg.r, int) and cfg.schedule == "constant" else cfg.per_block(depth)
    apply_token_merging(model.backbone, cfg)
    return spec.replace(inference={"mode": "tome", **spec.inference, "tome_r": r})


def remove_token_merging(backbone: nn.Module) -> nn.Module:
    """Undo `apply_token_merging` (a no-op on a backbone that does not merge)."""
    backbone.__dict__.pop("forward_features", None)
    return backbone


def merging_config(model: nn.Module) -> ToMeConfig | None:
    """The merging ``model`` (a classifier or backbone) runs with, or None."""
    fwd = getattr(getattr(model, "backbone", model), "__dict__", {}).get("forward_features")
    return fwd.cfg if isinstance(fwd, MergingForward) else None


def merging_view(model: nn.Module, cfg: ToMeConfig) -> nn.Module:
    """A shallow copy of classifier ``model`` whose backbone merges tokens; parameters and buffers are shared with
    ``model``, which keeps every token (Grad-CAM, masks and the fp32 reference run on it)."""
    problems = merging_problems(model)
    if problems:
        raise ConfigError(problems, source="token merging")
    view = _shallow(model)
    view.backbone = apply_token_merging(_shallow(model.backbone), cfg)
    return view


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with its own child table, sharing every child, parameter and buffer."""
    out = copy.copy(module)
    out._modules = dict(module._modules)  # type: ignore[assignment]
    out._parameters = dict(module._parameters)  # type: ignore[assignment]
    out._buffers = dict(module._buffers)  # type: ignore[assignment]
    out.__dict__.pop("forward_features", None)
    return out


def parse_tome(text: str) -> ToMeConfig:
    """``tome8`` (r 8 in every block), ``tome8d`` (decreasing from 16 to 0), ``tome[8,8,4,...]`` (per block)."""
    body = text.removeprefix("tome")
    try:
        if body.startswith("[") and body.endswith("]"):
            return ToMeConfig(r=tuple(int(v) for v in body[1:-1].split(",")))
        if body.endswith("d"):
            return ToMeConfig(r=int(body[:-1]), schedule="decreasing")
        return ToMeConfig(r=int(body))
    except ValueError:
        raise ConfigError(f"token merging {text!r} is not understood; write tome8 (r per block), tome8d (a "
                          f"decreasing schedule) or tome[8,8,4,...] (one r per block)") from None  # fmt: skip


def token_merging_problems(text: str) -> list[str]:
    """Config check for a recipe's ``model.token_merging`` ('' for none)."""
    if not text:
        return []
    try:
        parse_tome(text)
    except ConfigError as exc:
        return [f"token_merging: {exc.problems[0]}"]
    return []


def describe(cfg: ToMeConfig | None) -> dict[str, Any]:
    """A JSON-able record of a merging config (for benchmark and provenance output)."""
    if cfg is None:
        return {}
    return {"r": list(cfg.r) if isinstance(cfg.r, tuple) else cfg.r, "schedule": cfg.schedule,
            "prop_attn": cfg.prop_attn}  # fmt: skip
