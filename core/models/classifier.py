"""Classifier = Backbone + linear head, the registered builders, and build / save / load by `WeightSpec`."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from loupe.core.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError
from loupe.core.models.backbones import (
    Backbone,
    OpenClipText,
    OpenClipVisualBackbone,
    TimmViTBackbone,
    create_backbone,
)
from loupe.core.models.heads import MIL_HEADS, PatchMaskHead
from loupe.core.models.spec import WeightSpec
from loupe.core.models.weights import (
    SPEC_FILE,
    WEIGHTS_FILE,
    LoadReport,
    adapt_vit_keys,
    find_weights_file,
    load_into,
    load_state_dict,
    resolve_source,
)
from loupe.core.registry import MODELS

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """A Backbone with a linear head over its pooled embedding; ``num_outputs=0`` gives embeddings only."""

    def __init__(self, backbone: Backbone, num_outputs: int, head_drop: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(backbone.embed_dim, num_outputs) if num_outputs > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)  # [B, N, D_tok]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.pool(self.backbone.forward_features(x))  # [B, D]

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.backbone.pool(tokens)))  # [B, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # [B, K] logits

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named outputs (see `loupe.core.models.heads`): ``logits`` [B, K] and ``embedding`` [B, D]."""
        tokens = self.forward_features(x)
        emb = self.backbone.pool(tokens)
        return {"logits": self.head(self.head_drop(emb)), "embedding": emb}


class MaskClassifier(Classifier):
    """A Classifier that also localises: ``mask_logits`` [B, 1, H, W] from the patch tokens (`PatchMaskHead`)."""

    def __init__(self, backbone: Backbone, num_outputs: int, head_drop: float = 0.0):
        super().__init__(backbone, num_outputs, head_drop)
        self.mask_head = PatchMaskHead(backbone)

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.forward_features(x)
        emb = self.backbone.pool(tokens)
        return {
            "logits": self.head(self.head_drop(emb)),
            "embedding": emb,
            "mask_logits": self.mask_head(tokens, tuple(x.shape[-2:])),
        }


class MILClassifier(Classifier):
    """A Backbone with an attention-MIL head (``mil``: ``gated`` ABMIL or a small ``transformer``): the file's
    logits from all its unit embeddings (`aggregate_units`, as the spec's ``aggregation: attention`` asks), and each
    unit's own logits as the head's verdict on a bag of that unit alone."""

    def __init__(self, backbone: Backbone, num_outputs: int, head_drop: float = 0.0, mil_hidden: int = 128,
                 mil: str = "gated"):  # fmt: skip
        super().__init__(backbone, num_outputs, head_drop)
        if mil not in MIL_HEADS:
            raise ConfigError(f"mil {mil!r} is unknown; use one of {sorted(MIL_HEADS)}")
        self.head = nn.Identity()  # the MIL head scores units and bags
        self.mil = MIL_HEADS[mil](backbone.embed_dim, num_outputs, mil_hidden)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mil.instance_logits(self.backbone.pool(tokens))  # [B, K]

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        return {"logits": self.mil.instance_logits(emb), "embedding": emb}

    def aggregate_units(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.mil(embeddings)  # {"logits": [K], "attention": [N]}


class CosineClassifier(Classifier):
    """A zero-shot (CLIP) classifier: the L2-normalised image embedding against fixed class vectors (normalised
    text embeddings times the logit scale, stored as the head's weight). Few-shot methods start from it."""

    def __init__(self, backbone: Backbone, num_outputs: int, head_drop: float = 0.0):
        super().__init__(backbone, num_outputs, head_drop)
        self.head = nn.Linear(backbone.embed_dim, num_outputs, bias=False)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.normalize(self.backbone.pool(tokens), dim=-1)
        return self.head(self.head_drop(emb))  # [B, K]: scale * cosine to each class

    def forward_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.forward_features(x)
        emb = self.backbone.pool(tokens)
        return {"logits": self.head(torch.nn.functional.normalize(emb, dim=-1)), "embedding": emb}


_HEADS = {"linear": Classifier, "mask": MaskClassifier, "mil": MILClassifier, "cosine": CosineClassifier}
#: Keys a pretrained backbone checkpoint cannot hold: the heads Loupe puts on it (trained from scratch).
HEADS = ("head.*", "mask_head.*", "mil.*")


def vit_classifier(
    backbone: str,
    *,
    num_outputs: int = 0,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    head_drop: float = 0.0,
    head: str = "linear",
    mil_hidden: int = 128,
    mil: str = "gated",
    **backbone_kwargs: Any,
) -> Classifier:
    """The generic builder: every knob. Named variants bind sizes and register a name.

    ``img_size`` None keeps the architecture's own size (224 for timm ViTs, the config's for open_clip).
    ``head``: ``linear`` (labels), ``mask`` (labels + a per-pixel mask) or ``mil`` (an attention-MIL head over a
    file's units: ``mil`` ``gated`` or ``transformer``, ``mil_hidden`` wide).
    """
    if head not in _HEADS:
        raise ConfigError(f"head {head!r} is unknown; use one of {sorted(_HEADS)}")
    size = img_size if img_size is None or isinstance(img_size, int) else tuple(img_size)
    kw: dict[str, Any] = dict(in_chans=in_chans, **backbone_kwargs)
    if size is not None:
        kw["img_size"] = size
    if backbone.startswith("timm:"):
        kw["drop_path_rate"] = drop_path_rate
    elif isinstance(size, tuple):
        if size[0] != size[1]:
            raise ConfigError(f"open_clip towers need a square input, got img_size={size}")
        kw["img_size"] = size[0]
    extra = {"mil_hidden": mil_hidden, "mil": mil} if head == "mil" else {}
    return _HEADS[head](create_backbone(backbone, **kw), num_outputs, head_drop=head_drop, **extra)


def register_vit(name: str, backbone: str, *, domain: str = "core", **bound: Any) -> None:
    """Register ``name`` as ``vit_classifier(backbone, **bound, **call_kwargs)``."""

    def builder(**kwargs: Any) -> Classifier:
        return vit_classifier(backbone, **{**bound, **kwargs})

    builder.__doc__ = f"{backbone} {bound}"
    MODELS.register(name, builder, domain=domain, backbone=backbone, **bound)


# Small general-purpose variants; domains register their own named models on top.
register_vit("vit_micro_patch8", "timm:vit_tiny_patch16_224", patch_size=8, embed_dim=96, depth=4, num_heads=3)
register_vit("vit_tiny_patch16", "timm:vit_tiny_patch16_224")
register_vit("vit_small_patch16", "timm:vit_small_patch16_224")
register_vit("vit_base_patch16", "timm:vit_base_patch16_224")
register_vit("clip_vit_b16_visual", "open_clip:ViT-B-16")
register_vit("clip_vit_b32_visual", "open_clip:ViT-B-32")


# ---------------------------------------------------------------------------------------------- build and load
def build_model(spec: WeightSpec, *, load_weights: bool = True) -> tuple[Classifier, LoadReport | None]:
    """Build the registered architecture for ``spec`` and, when it has a source, load the weights into it."""
    model = MODELS.create(
        spec.architecture,
        num_outputs=spec.num_outputs,
        in_chans=spec.in_chans,
        img_size=tuple(spec.input_size[1:]),
        **spec.model_kwargs,
    )
    report = None
    if spec.source and load_weights:
        report = load_weights_into(model, spec.source, spec.layout)
        log.info("loaded %s into %s: %s", spec.source, spec.architecture, report.summary())
    return model, report


def load_weights_into(model: Classifier, source: str, layout: str) -> LoadReport:
    path = resolve_source(source)
    sd = load_state_dict(path)
    loaders = {"loupe": _load_loupe, "timm": _load_timm, "mae": _load_mae, "open_clip": _load_open_clip,
               "hf-clip": _load_hf_clip}  # fmt: skip
    loader = loaders.get(layout)
    if loader is None:
        raise ConfigError(f"weight layout {layout!r} is unknown; use one of {sorted(loaders)}")
    return loader(model, sd, source)


def _load_hf_clip(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> LoadReport:
    """A Hugging Face ``CLIPModel`` checkpoint (PLIP and others): renamed to open_clip's keys, then loaded as those."""
    from loupe.core.models.hf_clip import is_hf_clip, to_open_clip

    if not is_hf_clip(sd):
        raise WeightsMismatchError(f"{source}: not a Hugging Face CLIPModel checkpoint (no vision_model.* keys)")
    report = _load_open_clip(model, to_open_clip(sd), source)
    report.conversions.insert(0, "Hugging Face CLIPModel keys renamed to open_clip's (q/k/v joined)")
    return report


def _load_loupe(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> LoadReport:
    report = LoadReport()
    if isinstance(model.backbone, OpenClipVisualBackbone) and any(k.startswith("backbone.clip.") for k in sd):
        # folders saved before image backbones held only the visual tower: keep the tower, drop the text side
        text = [k for k in sd if k.startswith("backbone.clip.") and not k.startswith("backbone.clip.visual.")]
        sd = {k.replace("backbone.clip.visual.", "backbone.visual.", 1): v for k, v in sd.items() if k not in text}
        report.unexpected += text
        report.conversions.append(
            f"old layout: backbone.clip.visual.* read as backbone.visual.*, {len(text)} text keys dropped"
        )
    return load_into(model, sd, source=source, report=report)


def _timm_inner(model: Classifier, source: str) -> nn.Module:
    if not isinstance(model.backbone, TimmViTBackbone):
        raise WeightsMismatchError(f"{source}: timm/MAE weights need a timm backbone, the model has {model.backbone}")
    return model.backbone.model


def _load_timm(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> LoadReport:
    report = LoadReport()
    inner = _timm_inner(model, source)
    sd = adapt_vit_keys(sd, inner, report)
    full = {f"backbone.model.{k}": v for k, v in sd.items()}
    return load_into(
        model,
        full,
        allow_missing=HEADS,
        allow_unexpected=("backbone.model.head.*", "backbone.model.head_drop.*"),
        report=report,
        source=source,
    )


def _load_mae(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> LoadReport:
    """MAE pretraining checkpoints (facebook / medical MAE): encoder keys are timm's; decoder keys are dropped."""
    report = LoadReport()
    dropped = [k for k in sd if k.startswith(("decoder_", "decoder.", "mask_token"))]
    enc = {k: v for k, v in sd.items() if k not in dropped}
    if not any(k.startswith("blocks.") for k in enc):
        raise WeightsMismatchError(f"{source}: no encoder keys (blocks.*) in the MAE checkpoint; is it an MAE file?")
    report.unexpected += dropped
    if dropped:
        report.conversions.append(f"dropped {len(dropped)} decoder/mask-token keys")
    inner = _timm_inner(model, source)
    enc = adapt_vit_keys(enc, inner, report)
    uses_fc_norm = not isinstance(getattr(inner, "fc_norm", nn.Identity()), nn.Identity)
    full = {f"backbone.model.{k}": v for k, v in enc.items()}
    return load_into(
        model,
        full,
        allow_missing=(*HEADS, "backbone.model.fc_norm.*") if uses_fc_norm else HEADS,
        allow_unexpected=("backbone.model.norm.*", "backbone.model.head.*")
        if uses_fc_norm
        else ("backbone.model.head.*",),
        report=report,
        source=source,
    )


def _load_open_clip(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> LoadReport:
    from open_clip.model import resize_pos_embed

    if not isinstance(model.backbone, OpenClipVisualBackbone):
        raise WeightsMismatchError(f"{source}: open_clip weights need an open_clip backbone")
    report = LoadReport()
    if not any(k.startswith("visual.") for k in sd):  # a visual-tower-only file
        sd = {f"visual.{k}": v for k, v in sd.items()}
    before = sd.get("visual.positional_embedding")
    resize_pos_embed(sd, SimpleNamespace(visual=model.backbone.visual))
    if before is not None and sd["visual.positional_embedding"].shape != before.shape:
        report.conversions.append(
            f"visual.positional_embedding resampled to {tuple(sd['visual.positional_embedding'].shape)}"
        )
    text = [k for k in sd if not k.startswith("visual.")]
    if text:
        report.conversions.append(f"image model: {len(text)} text-tower keys dropped (load_open_clip_text reads them)")
    full = {f"backbone.{k}": v for k, v in sd.items() if k.startswith("visual.")}
    report.unexpected += text
    return load_into(model, full, allow_missing=HEADS, report=report, source=source)


def load_open_clip_text(arch: str, source: str | None = None) -> OpenClipText:
    """The text side of open_clip model ``arch`` (name or JSON config), with the weights of ``source`` when given:
    an open_clip checkpoint holding both towers (bare or ``state_dict``-wrapped, or a Hugging Face ``CLIPModel``),
    loaded strictly."""
    from loupe.core.models.backbones import build_open_clip
    from loupe.core.models.hf_clip import is_hf_clip, to_open_clip

    clip = build_open_clip(arch.removeprefix("open_clip:"))
    if source:
        sd = load_state_dict(resolve_source(source))
        sd = to_open_clip(sd) if is_hf_clip(sd) else sd
        missing, unexpected = clip.load_state_dict(sd, strict=False)
        text_missing = [k for k in missing if not k.startswith("visual.")]
        if text_missing or unexpected:
            raise WeightsMismatchError(
                f"{source} does not hold the text tower of {arch!r}: {len(text_missing)} text keys missing "
                f"({', '.join(text_missing[:5])}), {len(unexpected)} unexpected; pass the full open_clip checkpoint"
            )
    return OpenClipText(clip.eval(), arch.removeprefix("open_clip:"))


def save_model(model: nn.Module, spec: WeightSpec, out_dir: str | Path) -> Path:
    """Write ``weights.safetensors`` + ``weight_spec.json`` (source cleared, layout loupe, the weights' SHA-256
    recorded) into ``out_dir``."""
    from safetensors.torch import save_file

    from loupe.core.io.identity import file_sha256

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(state), str(out / WEIGHTS_FILE))
    sha = file_sha256(out / WEIGHTS_FILE)
    spec.replace(source=None, layout="loupe", weights_sha256=sha).save(out / SPEC_FILE)
    return out


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.setdefault(ptr, k)
    return out


def load_model_dir(path: str | Path) -> tuple[Classifier, WeightSpec]:
    """Load a folder written by `save_model` (or downloaded from MLflow), or one weights file inside such a folder
    (``file:`` references name the file they mean: ``folder/X.pt`` loads X.pt, never the folder's other weights).

    The weights file's SHA-256 is checked against the one its spec recorded at save / registration time before
    anything is built; a mismatch is refused (the file was changed or damaged after it was saved).
    """
    from loupe.core.io.identity import file_sha256

    p = Path(path)
    folder, weights = (p.parent, p) if p.is_file() else (p, None)
    if not (folder / SPEC_FILE).is_file():
        raise ConfigError(f"{folder} has no {SPEC_FILE}; it is not a Loupe model folder (save one with save_model)")
    spec = WeightSpec.load(folder / SPEC_FILE)
    try:
        own = find_weights_file(folder)  # the file save_model wrote, which the recorded SHA-256 describes
    except WeightsNotFoundError:
        if weights is None:
            raise
        own = None
    weights = weights or own
    assert weights is not None
    same = own is not None and weights.resolve() == own.resolve()
    if spec.weights_sha256 and same:
        actual = file_sha256(weights)
        if actual != spec.weights_sha256:
            raise WeightsMismatchError(
                f"{weights}: SHA-256 {actual[:12]}… differs from the {spec.weights_sha256[:12]}… recorded in "
                f"{folder / SPEC_FILE} when the model was saved; the file was changed or damaged. Restore the model "
                f"folder from its MLflow run (or re-save it with save_model if you changed the weights on purpose)"
            )
    source = f"local-dir:{folder}" if same else f"file:{weights}"
    model, _ = build_model(spec.replace(source=source, layout="loupe"))
    model.eval()
    return model, spec
