"""Pathology CLIP models and zero-shot tile and slide classification (``pathology.zeroshot``).

- `PATHOLOGY_CLIPS`: the public pathology CLIPs (hub id, checkpoint layout, architecture, tokenizer, preprocessing,
  licence); those Loupe can build are registered as model names (``path_clip_plip``, ...). Weights load through
  the usual sources: ``hf-hub:`` (from the local Hugging Face cache offline) or ``file:`` / ``local-dir:``.
- Prompts: a shipped template set (``configs/prompts.yaml``) with per-class names, merged with a user YAML.
- Class text embeddings: the mean over templates x names of the normalised text embeddings, re-normalised
  ``# [K, D]``, cached under ``<data dir>/text_embeddings`` keyed by the weights and the exact prompt strings.
- `zero_shot_model`: the image tower with a cosine head holding ``logit_scale * class embedding`` per class, saved
  as a normal Loupe model whose spec pools tiles to slides by top-k (MI-Zero), so ``loupe score pathology`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loupe.core.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from loupe.core.evaluation import EvalConfig, evaluation_report, log_report, predict
from loupe.core.models.backbones import OpenClipText
from loupe.core.models.classifier import CosineClassifier, build_model, register_vit, save_model, vit_classifier
from loupe.core.models.spec import CLIP_MEAN, CLIP_STD, WeightSpec
from loupe.core.models.weights import find_weights_file, resolve_source
from loupe.core.paths import data_dir
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.registry import MODELS
from loupe.domains.pathology.data import PatchData, load_patch_manifest, patch_dataset
from loupe.domains.pathology.models import pathology_spec

log = logging.getLogger(__name__)
PROMPTS_FILE = Path(__file__).parent / "configs" / "prompts.yaml"
CLIP_LAYOUTS = ("open_clip", "hf-clip", "loupe")


# ------------------------------------------------------------------------------------------------ the model table
@dataclass(frozen=True)
class PathologyClip:
    """A public pathology CLIP. ``name``: its Loupe model name ('' when Loupe cannot build it); ``layout``: how its
    checkpoint is laid out (``open_clip``, ``hf-clip`` or ``unsupported``); ``architecture``: the open_clip config
    (a built-in name, or the hub's ``open_clip_config.json`` as a weight source); ``image_size``, ``mean``, ``std``:
    its preprocessing; ``note``: what was checked and what was not."""

    key: str
    name: str
    title: str
    hub: str
    layout: str
    architecture: str
    tokenizer: str
    licence: str = "see model card"
    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    gated: bool = False
    note: str = ""

    def weight_spec(self, label_names: tuple[str, ...], *, source: str | None = None, architecture: str = "",
                    tile_mpp: float = 0.5, topk: int = 8, name: str = "") -> WeightSpec:  # fmt: skip
        """A zero-shot tile classifier spec on this model (``source`` defaults to the hub weights; ``architecture``
        overrides the registered model name, e.g. with a tiny model of the same layout)."""
        if self.layout == "unsupported":
            raise ConfigError(f"{self.title} ({self.hub}) cannot be loaded by Loupe: {self.note}")
        return zero_shot_spec(name or self.name, architecture or self.name, label_names, source=source or self.hub,
                              layout=self.layout, img_size=self.image_size, tile_mpp=tile_mpp, topk=topk,
                              mean=self.mean, std=self.std, licence=self.licence)  # fmt: skip


_BPE = "CLIP byte-pair encoding (open_clip SimpleTokenizer), 77 tokens"
# Hub ids and licences were checked against the model cards where the search index held them (PLIP, QuiltNet-B-32,
# BiomedCLIP, CONCH, PathGen-CLIP, UniMed-CLIP); each ``note`` says what was not.
PATHOLOGY_CLIPS: dict[str, PathologyClip] = {c.key: c for c in (
    PathologyClip("plip", "path_clip_plip", "PLIP", "hf-hub:vinid/plip", "hf-clip", "ViT-B-32-quickgelu", _BPE,
                  note="Hugging Face CLIPModel fine-tuned from OpenAI CLIP ViT-B/32 (QuickGELU); licence not stated "
                       "on the card we saw"),
    PathologyClip("quiltnet_b32", "path_clip_quiltnet_b32", "QuiltNet-B-32", "hf-hub:wisdomik/QuiltNet-B-32",
                  "open_clip", "ViT-B-32-quickgelu", _BPE, licence="MIT",
                  note="fine-tuned from OpenAI CLIP, hence QuickGELU; not checked against the hub's "
                       "open_clip_config.json"),
    PathologyClip("quiltnet_b16", "path_clip_quiltnet_b16", "QuiltNet-B-16", "hf-hub:wisdomik/QuiltNet-B-16",
                  "open_clip", "ViT-B-16-quickgelu", _BPE, licence="see model card (QuiltNet-B-32 is MIT)",
                  note="assumed fine-tuned from OpenAI CLIP like B-32 (QuickGELU); not verified"),
    PathologyClip("biomedclip", "path_clip_biomedclip", "BiomedCLIP",
                  "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "open_clip",
                  "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224/open_clip_config.json",
                  "PubMedBERT WordPiece (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract), 256 tokens",
                  licence="MIT (research use, per its card)",
                  note="timm ViT-B/16 image tower + Hugging Face PubMedBERT text tower; the architecture is the "
                       "hub's open_clip_config.json, so it must be in the Hugging Face cache to build"),
    PathologyClip("conch", "", "CONCH", "hf-hub:MahmoodLab/CONCH", "unsupported", "conch_ViT-B-16 (CoCa)",
                  "CONCH's own tokenizer (conch.open_clip_custom)", licence="CC-BY-NC-ND-4.0", image_size=448,
                  gated=True, note="a CoCa model built by MahmoodLab's own open_clip_custom code, which open_clip "
                                   "cannot load; gated on the hub (accept the terms to download)"),
    PathologyClip("pathgen", "path_clip_pathgen", "PathGen-CLIP", "hf-hub:jamessyx/PathGen-CLIP/pathgenclip.pt",
                  "open_clip", "ViT-B-16", _BPE, licence="see model card (its README metadata says CC-BY-2.0)",
                  gated=True, note="ViT-B-16 as its README loads it; the file name on the hub is not verified"),
    PathologyClip("pathgen_l", "path_clip_pathgen_l", "PathGen-CLIP-L",
                  "hf-hub:jamessyx/PathGen-CLIP/pathgen-clip-l.pt", "open_clip", "ViT-L-14", _BPE,
                  licence="see model card (its README metadata says CC-BY-2.0)", gated=True,
                  note="ViT-L/14 per the paper; third-party code builds it as ViT-L-14-336 - not verified"),
    PathologyClip("unimed", "", "UniMed-CLIP", "hf-hub:UzairK/unimed-clip-vit-b16", "unsupported",
                  "ViT-B-16 image tower + BiomedBERT text tower", "BiomedBERT WordPiece", licence="CC-BY-NC-4.0",
                  note="trained with UniMed-CLIP's own open_clip fork; its checkpoint layout is not verified"),
    PathologyClip("bmca", "path_clip_bmca", "BMCA-CLIP (BIOMEDICA)", "hf-hub:BIOMEDICA/BMCA-CLIP", "open_clip",
                  "ViT-L-14", _BPE, note="ViT-L/14 per the BIOMEDICA paper; the hub id is not verified (the "
                                         "BIOMEDICA organisation now lists BMC_CLIP_CF, MIT)"),
)}  # fmt: skip


def clip_entry(model: str) -> PathologyClip | None:
    """The table entry whose Loupe model name is ``model``, or None (a CLIP registered elsewhere)."""
    return next((c for c in PATHOLOGY_CLIPS.values() if c.name == model and model), None)


def pathology_clip(key_or_name: str) -> PathologyClip:
    """The table entry for a key (``plip``) or a Loupe model name (``path_clip_plip``)."""
    entry = PATHOLOGY_CLIPS.get(key_or_name) or clip_entry(key_or_name)
    if entry is not None:
        return entry
    import difflib

    known = sorted([*PATHOLOGY_CLIPS, *(c.name for c in PATHOLOGY_CLIPS.values() if c.name)])
    raise UnknownNameError("pathology CLIP", key_or_name, known, difflib.get_close_matches(key_or_name, known, n=3))


def _image_only_config(hub_config: str) -> Path:
    """The hub's open_clip config with its text tower replaced by a tiny stub, written under the data dir: the image
    tower then builds without the text tower's Hugging Face config (whose keys the image model drops anyway)."""
    cfg = json.loads(resolve_source(hub_config).read_text())
    cfg = cfg.get("model_cfg", cfg)
    image = {k: v for k, v in cfg.items() if k not in ("text_cfg", "custom_text")}
    image["text_cfg"] = {"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}
    blob = json.dumps(image, sort_keys=True)
    out = data_dir() / "clip_configs" / f"image-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(blob)
    return out


def _register(c: PathologyClip) -> None:
    if c.layout == "unsupported" or c.name in MODELS:
        return
    if not c.architecture.startswith("hf-hub:"):
        register_vit(c.name, f"open_clip:{c.architecture}", domain="pathology")
        return

    def build(**kwargs: Any):
        return vit_classifier(f"open_clip:{_image_only_config(c.architecture)}", **kwargs)

    build.__doc__ = f"{c.title} image tower, architecture from {c.architecture}"
    MODELS.register(c.name, build, domain="pathology", backbone=f"open_clip:{c.architecture}", kind="clip")


for _c in PATHOLOGY_CLIPS.values():
    _register(_c)


def clip_architecture(model: str) -> str:
    """The open_clip architecture (config name or JSON path) behind a registered CLIP model name; a hub config is
    resolved to its local file."""
    backbone = str(MODELS.entry(model).meta.get("backbone", ""))
    if not backbone.startswith("open_clip:"):
        raise ConfigError(f"model {model!r} is not an open_clip model (backbone {backbone!r}); zero-shot needs a CLIP")
    arch = backbone.removeprefix("open_clip:")
    return str(resolve_source(arch)) if arch.startswith("hf-hub:") else arch


# ----------------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptSet:
    """``templates``: strings with one ``{}`` for the class name; ``classes``: class → its names (synonyms)."""

    templates: tuple[str, ...]
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _read_prompt_file(path: Path) -> dict[str, Any]:
    from loupe.core.config import load_yaml

    data = load_yaml(path)
    unknown = set(data) - {"templates", "classes", "replace_templates"}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}; a prompt file has templates, classes, replace_templates",
                          source=str(path))  # fmt: skip
    templates = data.get("templates") or []
    if not isinstance(templates, list):
        raise ConfigError(f"templates must be a list of strings, got {templates!r}", source=str(path))
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"templates[{i}] {t!r} must hold exactly one '{{}}' where the class name goes, "
                              f"e.g. 'an H&E image of {{}}.'", source=str(path))  # fmt: skip
    classes = data.get("classes") or {}
    if not isinstance(classes, dict) or not all(isinstance(v, list) and v for v in classes.values()):
        raise ConfigError("classes must map each class to a non-empty list of names, e.g. LUAD: [lung "
                          "adenocarcinoma]", source=str(path))  # fmt: skip
    return {"templates": templates, "classes": classes, "replace": bool(data.get("replace_templates", False))}


def load_prompts(user_file: str | Path | None = None) -> PromptSet:
    """The shipped prompt set, with ``user_file`` merged over it: its templates added (or used alone with
    ``replace_templates: true``), its class names replacing the shipped ones class by class."""
    base = _read_prompt_file(PROMPTS_FILE)
    templates, classes = list(base["templates"]), dict(base["classes"])
    if user_file:
        user = _read_prompt_file(Path(user_file))
        templates = user["templates"] if user["replace"] else templates + user["templates"]
        classes |= user["classes"]
    if not templates:
        raise ConfigError("no prompt templates left: the user file replaces them with none", source=str(user_file))
    unique = tuple(dict.fromkeys(templates))
    return PromptSet(unique, {str(k): tuple(str(n) for n in v) for k, v in classes.items()})


def class_prompts(prompts: PromptSet, classes: tuple[str, ...],
                  names: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[str]]:  # fmt: skip
    """Each class's prompt strings: every template filled with each of its names (``names`` first, then the
    prompt set's, else the class label itself)."""
    out = {}
    for c in classes:
        chosen = (names or {}).get(c) or prompts.classes.get(c)
        if not chosen:
            log.warning("class %r has no names in the prompt set; its label itself is used in the prompts", c)
            chosen = (c,)
        out[c] = [t.replace("{}", n) for n in chosen for t in prompts.templates]
    return out


# ------------------------------------------------------------------------------------------ text embeddings
@dataclass
class TextEmbeddings:
    """``embeddings``: one unit vector per class ``# [K, D]``; ``logit_scale``: the model's (exp of its log)."""

    embeddings: torch.Tensor
    logit_scale: float
    cached: bool = False


def weights_fingerprint(arch: str, source: str) -> dict[str, Any]:
    """What identifies a text tower cheaply: the architecture (and its config file's hash) and the weights file's
    path, size and modification time."""
    path = find_weights_file(resolve_source(source))
    st = path.stat()
    out: dict[str, Any] = {"arch": arch, "weights": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if arch.endswith(".json") and Path(arch).is_file():
        out["arch_sha256"] = hashlib.sha256(Path(arch).read_bytes()).hexdigest()[:16]
    return out


def _text_tower(arch: str, source: str | None) -> OpenClipText:
    from loupe.core.models.classifier import load_open_clip_text

    try:
        return load_open_clip_text(arch, source)
    except OSError as exc:  # a Hugging Face text tower (BiomedCLIP) whose config/tokenizer is not in the cache
        cfg = json.loads(Path(arch).read_text()) if arch.endswith(".json") else {}
        hf = cfg.get("model_cfg", cfg).get("text_cfg", {}).get("hf_model_name", "its Hugging Face text model")
        raise WeightsNotFoundError(
            f"the text tower of {arch!r} needs files that are not in the local Hugging Face cache ({exc}); run "
            f"`huggingface-cli download {hf}` where a network exists, or point HF_HOME at a cache that holds it"
        ) from None


@torch.no_grad()
def encode_classes(text: OpenClipText, prompts: dict[str, list[str]], chunk: int = 256) -> torch.Tensor:
    """Mean of each class's normalised prompt embeddings, re-normalised  # [K, D]."""
    text.eval()
    out = []
    for strings in prompts.values():
        emb = torch.cat([text(strings[i : i + chunk]).float().cpu() for i in range(0, len(strings), chunk)])
        out.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)


def class_text_embeddings(arch: str, source: str | None, prompts: dict[str, list[str]], *,
                          cache: bool = True) -> TextEmbeddings:  # fmt: skip
    """Class embeddings of ``prompts`` (class → prompt strings) by the text tower of ``arch`` with the weights of
    ``source``; read from the cache when the same weights and prompt strings were encoded before. A random text
    tower (no ``source``) is never cached."""
    key = None
    if source and cache:
        blob = json.dumps({"model": weights_fingerprint(arch, source), "prompts": prompts}, sort_keys=True)
        key = hashlib.sha256(blob.encode()).hexdigest()[:32]
        hit = _cache_read(key, blob)
        if hit is not None:
            return hit
    text = _text_tower(arch, source)
    emb = encode_classes(text, prompts)
    scale = float(text.clip.logit_scale.detach().exp()) if hasattr(text.clip, "logit_scale") else 100.0
    if key is not None:
        _cache_write(key, blob, emb, scale)
    return TextEmbeddings(emb, scale)


def _cache_path(key: str) -> Path:
    return data_dir() / "text_embeddings" / f"{key}.safetensors"


def _cache_read(key: str, blob: str) -> TextEmbeddings | None:
    from safetensors import safe_open

    p = _cache_path(key)
    if not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            if (f.metadata() or {}).get("key") != blob:
                return None
            emb, scale = f.get_tensor("embeddings"), f.get_tensor("logit_scale")
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
        log.warning("text-embedding cache %s is unreadable (%s); recomputing", p, exc)
        return None
    log.info("class text embeddings read from the cache %s", p)
    return TextEmbeddings(emb, float(scale), cached=True)


def _cache_write(key: str, blob: str, emb: torch.Tensor, scale: float) -> None:
    from safetensors.torch import save_file

    p = _cache_path(key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    save_file({"embeddings": emb.contiguous(), "logit_scale": torch.tensor([scale])}, str(tmp), metadata={"key": blob})
    tmp.replace(p)


# ------------------------------------------------------------------------------------------------- zero-shot
def zero_shot_spec(name: str, model: str, label_names: tuple[str, ...], *, source: str | None, layout: str,
                   img_size: int = 224, tile_mpp: float = 0.5, topk: int = 8, mean: tuple[float, ...] = CLIP_MEAN,
                   std: tuple[float, ...] = CLIP_STD, licence: str = "unspecified",
                   description: str = "") -> WeightSpec:  # fmt: skip
    """A multiclass tile classifier spec on CLIP model ``model`` with a cosine head: CLIP normalisation, tiles at
    ``tile_mpp`` microns per pixel, slides pooled by the mean of each class's ``topk`` highest tile scores."""
    if layout not in CLIP_LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not a CLIP checkpoint layout; use one of {list(CLIP_LAYOUTS)}")
    return pathology_spec(name, model, tuple(label_names), tile_px=img_size, tile_mpp=tile_mpp, task="multiclass",
                          aggregation=f"topk:{topk}", mean=tuple(mean), std=tuple(std), source=source,
                          layout=layout if source else "loupe", model_kwargs={"head": "cosine"}, licence=licence,
                          description=description)  # fmt: skip


def zero_shot_model(spec: WeightSpec, text: TextEmbeddings | torch.Tensor, logit_scale: float | None = None
                    ) -> CosineClassifier:  # fmt: skip
    """The image tower of ``spec`` (its weights loaded) with a cosine head of ``logit_scale * text embedding`` per
    class, in eval mode: logits ``[B, K]`` = scale * cosine(image embedding, class embedding)."""
    emb = text.embeddings if isinstance(text, TextEmbeddings) else text
    scale = float(logit_scale or (text.logit_scale if isinstance(text, TextEmbeddings) else 100.0))
    if spec.source:
        resolve_source(spec.source)  # a missing checkpoint fails here, before the tower is built
    model, _ = build_model(spec)
    if not isinstance(model, CosineClassifier):
        raise ConfigError(f"spec {spec.name!r} does not build a cosine head; set model_kwargs: {{head: cosine}}")
    k, d = model.head.weight.shape
    if tuple(emb.shape) != (k, d):
        raise ConfigError(f"class embeddings of shape {tuple(emb.shape)} do not fit {k} classes x the image "
                          f"tower's {d}-d embedding; the text side must come from the same CLIP as the image "
                          "tower")  # fmt: skip
    with torch.no_grad():
        model.head.weight.copy_(scale * torch.nn.functional.normalize(emb.float(), dim=-1))
    return model.eval()


# --------------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class ClipModelConfig:
    """``name``: a registered CLIP model; ``init``: its weights ('' = the hub weights of a `PATHOLOGY_CLIPS` entry,
    or ``file:``/``local-dir:``/``hf-hub:``/MLflow URI); ``init_layout``: '' (the entry's) or open_clip / hf-clip /
    loupe; ``text_init``: the text tower's weights ('' = ``init``); ``logit_scale`` 0 = the checkpoint's own."""

    name: str = "path_clip_plip"
    init: str = ""
    init_layout: str = ""
    text_init: str = ""
    img_size: int = 224
    tile_mpp: float = 0.5
    topk: int = 8
    logit_scale: float = 0.0

    def problems(self) -> list[str]:
        out = [] if self.name in MODELS else [f"name: model {self.name!r} is not registered (`loupe models`)"]
        if self.init_layout and self.init_layout not in CLIP_LAYOUTS:
            out.append(f"init_layout: expected '' or one of {list(CLIP_LAYOUTS)}, got {self.init_layout!r}")
        if self.topk < 1 or self.img_size < 1 or self.tile_mpp <= 0 or self.logit_scale < 0:
            out.append("topk and img_size must be >= 1, tile_mpp > 0 and logit_scale >= 0 (0 = the checkpoint's)")
        return out


@dataclass(frozen=True)
class PromptConfig:
    """``file``: a prompt YAML merged over the shipped set; ``classes``: manifest label → the names put in the
    templates (over the prompt set's); ``cache``: reuse class text embeddings computed before."""

    file: str = ""
    classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cache: bool = True


@dataclass(frozen=True)
class ZeroShotConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="pathology-zeroshot"))
    data: PatchData = field(default_factory=lambda: PatchData(val_fraction=0.0))
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n_boot=1000))


@register_recipe("pathology.zeroshot", domain="pathology")
class ZeroShotRecipe(Recipe):
    """Zero-shot patch classification with a pathology CLIP: class prompts → text embeddings → cosine head; the
    test split scored (macro AUROC with bootstrap CI, accuracy) and the model saved for slide scoring."""

    config_cls = ZeroShotConfig
    default_name = "pathology_zeroshot"

    def setup(self) -> None:
        from loupe.core.distributed import pick_device

        cfg = self.cfg
        self.device = pick_device(cfg.run.device)
        self.out = self.output_dir(cfg.run.name or self.default_name)
        self.frame, self.classes = load_patch_manifest(cfg.data, cfg.run.seed)
        self._setup_zero_shot()

    def _sources(self) -> tuple[str, str, str]:
        m = self.cfg.model
        entry = clip_entry(m.name)
        init = m.init or (entry.hub if entry else "")
        if not init:
            raise ConfigError(f"model.init is empty and {m.name!r} is not in PATHOLOGY_CLIPS; pass model.init=file:... "
                              "(a CLIP checkpoint holding both towers)")  # fmt: skip
        source = resolve_init(init, self.tracker, self.out / "init") or init
        layout = m.init_layout or (entry.layout if entry else "open_clip")
        return source, layout, m.text_init or source

    def _setup_zero_shot(self) -> None:
        m, p = self.cfg.model, self.cfg.prompts
        source, layout, text_source = self._sources()
        self.prompts = class_prompts(load_prompts(p.file or None), self.classes, p.classes)
        self.text = class_text_embeddings(clip_architecture(m.name), text_source, self.prompts, cache=p.cache)
        entry = clip_entry(m.name)
        n = len(next(iter(self.prompts.values())))
        self.spec = zero_shot_spec(self.cfg.run.name or self.default_name, m.name, self.classes, source=source,
                                   layout=layout, img_size=m.img_size, tile_mpp=m.tile_mpp, topk=m.topk,
                                   mean=entry.mean if entry else CLIP_MEAN, std=entry.std if entry else CLIP_STD,
                                   licence=entry.licence if entry else "unspecified",
                                   description=f"zero-shot CLIP, {n} prompts per class")  # fmt: skip
        self.model = zero_shot_model(self.spec, self.text, m.logit_scale or None).to(self.device)

    def loader(self, split: str, frame=None, train: bool = False):
        from loupe.core.distributed import DistInfo, make_loader

        d = self.cfg.data
        ds = patch_dataset(self.frame if frame is None else frame, self.classes, d, self.spec, split)
        return make_loader(ds, DistInfo(), batch_size=d.batch_size, num_workers=d.num_workers, train=train,
                           seed=self.cfg.run.seed)  # fmt: skip

    def test_metrics(self, run, model: nn.Module, prefix: str = "test") -> dict[str, float]:
        """Score the test split, log the report under ``prefix`` and a predictions CSV; the headline metrics."""
        import pandas as pd

        loader = self.loader("test")
        S, Y, metas = predict(model, loader, self.device, task="multiclass")
        frame = loader.dataset.frame
        groups = frame["group"].to_numpy() if "group" in frame.columns else None
        report = evaluation_report(Y, S, self.classes, cfg=self.cfg.eval, groups=groups, prefix=prefix)
        report.metrics[f"{prefix}_accuracy"] = float((S.argmax(1) == Y.argmax(1)).mean())
        log_report(run, report, self.out / "evaluation", prefix=prefix)
        table = pd.DataFrame({"path": [str(m.get("path", "")) for m in metas], "label": Y.argmax(1)})
        for j, c in enumerate(self.classes):
            table[f"score_{c}"] = S[:, j]
        csv = self.out / "evaluation" / f"{prefix}_predictions.csv"
        table.to_csv(csv, index=False)
        run.log_artifact(csv, "evaluation")
        return report.metrics

    def save(self, run, model: nn.Module) -> Path:
        model_dir = save_model(model, self.spec, self.out / "model")
        run.log_dict(model_signature(self.spec), "model/signature.json")
        run.log_model_dir(model_dir)
        return model_dir

    def evaluate(self) -> dict[str, Any]:
        with self.tracked_run() as run:
            run.set_tags({"init": self.spec.source or "", "text_cache": str(self.text.cached)})
            run.log_dict({"prompts": self.prompts, "logit_scale": self.text.logit_scale}, "zeroshot/prompts.json")
            metrics = self.test_metrics(run, self.model)
            model_dir = self.save(run, self.model)
            per_class = len(next(iter(self.prompts.values())))
            return {"run_id": run.run_id, **headline_metrics(metrics, "test"), "model_dir": str(model_dir),
                    "text_cached": self.text.cached, "prompts_per_class": per_class}  # fmt: skip

    def train(self) -> dict[str, Any]:
        """Zero-shot has nothing to train: the same as `evaluate`."""
        return self.evaluate()


def headline_metrics(metrics: dict[str, float], prefix: str) -> dict[str, Any]:
    """The numbers a recipe returns from an `evaluation_report`'s metrics under ``prefix``."""
    m = metrics
    return {f"{prefix}_macro_auroc": m[f"{prefix}_macro_auroc"], f"{prefix}_accuracy": m[f"{prefix}_accuracy"],
            f"{prefix}_macro_auroc_ci": [m[f"{prefix}_macro_auroc_ci_low"], m[f"{prefix}_macro_auroc_ci_high"]],
            f"{prefix}_mean_ece": float(m[f"{prefix}_mean_ece"])}  # fmt: skip
