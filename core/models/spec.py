"""`WeightSpec`: what a set of weights is, where it comes from and how inputs must be prepared for it.

Transforms are derived from the spec (``loupe.core.transforms``), so a chest X-ray model and a CLIP tower can
never get each other's normalisation. A spec travels with the weights as ``weight_spec.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loupe.core.errors import ConfigError, UnsupportedInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Task = Literal["multilabel", "multiclass", "binary", "embedding"]
Layout = Literal["loupe", "timm", "open_clip", "mae", "hf-clip"]
#: Named outputs a model may return (`loupe.core.models.outputs`).
OUTPUT_KINDS = ("scores", "mask", "embedding", "attention")
#: How unit results become the file's result: mean / max of unit scores, mean of the top K, or the model's own
#: attention-MIL head over unit embeddings.
AGGREGATIONS = ("mean", "max", "topk:K", "attention")


@dataclass(frozen=True)
class WeightSpec:
    """Everything needed to rebuild a model and feed it correctly.

    ``source``: ``hf-hub:org/repo``, ``local-dir:/path``, ``file:/path.safetensors|.pt|.pth``, ``tag:NAME`` (a
    registered tag), or None for random initialisation. ``layout`` tells how the checkpoint's keys are laid out.
    ``input_size`` is (channels, height, width); ``mean``/``std`` apply to intensities scaled to 0..1;
    ``intensity`` documents the convention (e.g. "DICOM VOI-windowed, MONOCHROME2, 0..1").
    ``thresholds`` maps each label to its operating threshold on the score (probability) scale.
    ``modalities``: the DICOM modalities (``CR``, ``DX``, ...) the model is meant for; a DICOM input of another
    modality is refused by `check_scope` instead of being scored silently wrong. Empty = any input; files
    without a modality (PNG, JPEG, TIFF) are always accepted.
    ``scope``: further rules on the input's metadata, each ``key: rule`` with rule a list of allowed values, a
    ``{"min": a, "max": b}`` range, or ``true`` (the key must be present and truthy): a pathology model states
    ``{"mpp": {"min": 0.2, "max": 0.6}}``, a face model ``{"face_found": true}``. A rule on a key the input's
    metadata lacks is skipped, except ``true``.
    ``outputs``: the named outputs the model returns (see `OUTPUT_KINDS`); ``aggregation``: how unit scores make
    the file's (see `AGGREGATIONS`); ``unit_thresholds``: operating thresholds per label for single units
    (default: ``thresholds``); ``mask_threshold``: the pixel-probability threshold of a ``mask`` output.
    ``unit_options``: how the domain cuts units for this model (a pathology model's tile size in microns, a video
    model's frames per clip); a run may override them (``loupe score --option key=value``). Part of the
    preprocessing hash.
    ``weights_sha256``: the SHA-256 of the folder's weights file, written by `save_model` and checked by
    `load_model_dir` before anything is built (a changed or damaged file is refused, not loaded).
    ``inference``: how the model runs when it scores (`loupe.core.models.inference`): ``mode`` (``fp32``,
    ``bf16``, ``int8``, ``...+compile``, ``...+tome8``, or ``auto``: measured on each machine), ``tolerance`` (the
    accuracy cost ``auto`` accepts: AUROC drop, default 0.005) and ``tome_r`` (the token-merging r, or one per
    block, the model was fine-tuned with). A mode other than fp32 is part of the preprocessing hash.
    """

    name: str
    architecture: str
    source: str | None = None
    layout: Layout = "loupe"
    task: Task = "multilabel"
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    intensity: str = "8-bit RGB scaled to 0..1"
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    resize_mode: Literal["squash", "shorter_side_crop", "center_crop"] = "squash"
    label_names: tuple[str, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    domain: str = "core"
    version: str = "0"
    licence: str = "unspecified"
    description: str = ""
    modalities: tuple[str, ...] = ()
    scope: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("scores",)
    aggregation: str = "mean"
    unit_thresholds: dict[str, float] = field(default_factory=dict)
    mask_threshold: float = 0.5
    unit_options: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source=f"weight spec {self.name!r}")

    def problems(self) -> list[str]:
        out = []
        c = self.input_size[0]
        if c not in (1, 3):
            out.append(f"input_size channels must be 1 or 3, got {c}")
        if not all(isinstance(v, int) and MIN_SIDE <= v <= MAX_SIDE for v in self.input_size[1:]):
            out.append(f"input_size height and width must be whole numbers in [{MIN_SIDE}, {MAX_SIDE}], got "
                       f"{list(self.input_size[1:])}")  # fmt: skip
        out += _model_kwargs_problems(self.model_kwargs)
        if len(self.mean) != c or len(self.std) != c:
            out.append(f"mean/std need {c} values for {c} channel(s), got {len(self.mean)}/{len(self.std)}")
        if not all(math.isfinite(float(v)) for v in (*self.mean, *self.std)):
            out.append(f"mean/std must be finite numbers, got mean {self.mean}, std {self.std}")
        elif any(s <= 0 for s in self.std):
            out.append(f"std values must be > 0, got {self.std}")
        for name, table in (("thresholds", self.thresholds), ("unit_thresholds", self.unit_thresholds)):
            unknown = set(table) - set(self.label_names)
            if unknown:
                out.append(f"{name} name labels that are not in label_names: {sorted(unknown)}")
            for k, v in table.items():
                if not 0.0 <= float(v) <= 1.0:
                    out.append(f"{name[:-1]} for {k!r} must be a probability in [0, 1], got {v}")
        if self.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(self.weights_sha256)):
            out.append(f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}")
        bad = [m for m in self.modalities if not (isinstance(m, str) and m.isalnum() and m.isupper())]
        if bad:
            out.append(f"modalities must be DICOM modality codes in capitals (CR, DX, CT, ...), got {bad}")
        out += _inference_problems(self)
        return out + self._output_problems() + [p for k, r in self.scope.items() if (p := _rule_problem(k, r))]

    def _output_problems(self) -> list[str]:
        out = []
        unknown = [o for o in self.outputs if o not in OUTPUT_KINDS]
        if unknown:
            out.append(f"outputs {unknown} are unknown; a model may return {list(OUTPUT_KINDS)}")
        if self.task != "embedding" and "scores" not in self.outputs:
            out.append(f"outputs must include 'scores' for a {self.task} model, got {list(self.outputs)}")
        agg = self.aggregation
        k = agg.removeprefix("topk:")
        if agg not in ("mean", "max", "attention") and not (agg.startswith("topk:") and k.isdigit() and int(k) > 0):
            out.append(f"aggregation {agg!r} is unknown; use one of {list(AGGREGATIONS)} (K a whole number >= 1)")
        if agg == "attention" and "attention" not in self.outputs:
            out.append("aggregation 'attention' needs a model with an 'attention' output (an attention-MIL head)")
        if not 0.0 < float(self.mask_threshold) < 1.0:
            out.append(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        return out

    def check_scope(self, meta: dict[str, Any], path: str | Path) -> None:
        """Refuse an input outside the model's scope (`UnsupportedInputError`): a DICOM modality not in
        ``modalities``, or metadata breaking a ``scope`` rule."""
        modality = str(meta.get("modality") or "").upper()
        if self.modalities and modality and modality not in self.modalities:
            raise UnsupportedInputError(
                f"{path}: DICOM modality {modality} is outside the scope of model {self.name!r}, which is meant for "
                f"{', '.join(self.modalities)} images; score it with a model made for {modality}, or, if this model "
                f"really applies, add {modality!r} to 'modalities' in its weight_spec.json"
            )
        for key, rule in self.scope.items():
            broken = _rule_broken(key, rule, meta)
            if broken:
                raise UnsupportedInputError(
                    f"{path}: {broken}, outside the scope of model {self.name!r} (its weight spec's scope says "
                    f"{key}: {json.dumps(rule)}); score it with a model made for such inputs"
                )

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def replace(self, **changes: Any) -> WeightSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in _TUPLE_FIELDS:
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"weight spec has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        for k in _TUPLE_FIELDS:
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> WeightSpec:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); restore it from the model's MLflow run") from None

    def preprocessing(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields that decide how an input becomes a tensor (hashed into every prediction row); ``options``:
        a run's unit options on top of the spec's own."""
        keys = ("input_size", "mean", "std", "intensity", "interpolation", "resize_mode")
        out = {k: (list(v) if isinstance(v := getattr(self, k), tuple) else v) for k in keys}
        units = {**self.unit_options, **(options or {})}
        out = {**out, "unit_options": units} if units else out
        mode = str(self.inference.get("mode", "fp32"))
        if mode != "fp32":  # fp32 (the default) leaves the hash of every earlier model as it was
            out["inference_mode"] = mode
            if "tome" in mode.split("+") and self.inference.get("tome_r") is not None:
                out["tome_r"] = self.inference["tome_r"]
        return out

    def preprocessing_hash(self, options: dict[str, Any] | None = None) -> str:
        blob = json.dumps(self.preprocessing(options), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_TUPLE_FIELDS = ("input_size", "mean", "std", "label_names", "modalities", "outputs")


MIN_SIDE, MAX_SIDE = 8, 4096  # model input sides in pixels
#: Bounds on the size knobs a spec may pass to a model builder (a spec file is user input: depth 4000 ran for
#: minutes and gigabytes before failing).
KWARG_BOUNDS = {"depth": 64, "num_heads": 64, "embed_dim": 8192, "patch_size": 64, "mil_hidden": 8192,
                "decoder_depth": 32, "decoder_dim": 8192, "mlp_ratio": 16}  # fmt: skip
#: Keys that make a builder read files or the network: never from a spec (timm's pretrained_cfg_overlay,
#: checkpoint_path, cache_dir, ...).
_KWARG_REFUSED_PREFIXES = ("pretrained", "checkpoint", "cache", "hf_hub", "hub", "url", "file")
_KWARG_REFUSED_SUFFIXES = ("_path", "_file", "_dir", "_url", "_uri")


def _model_kwargs_problems(kwargs: dict[str, Any]) -> list[str]:
    """``model_kwargs`` hold plain numbers, booleans and short names only, within `KWARG_BOUNDS`."""
    out = []
    for k, v in kwargs.items():
        if k.lower().startswith(_KWARG_REFUSED_PREFIXES) or k.lower().endswith(_KWARG_REFUSED_SUFFIXES):
            out.append(f"model_kwargs.{k} is not allowed: a weight spec may not make the model builder read files "
                       "or the network (weights come from the spec's source)")  # fmt: skip
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, (int, float)):
            if not math.isfinite(float(v)) or v < 0 or v > KWARG_BOUNDS.get(k, math.inf):
                out.append(f"model_kwargs.{k} = {v} is out of range (0 to {KWARG_BOUNDS.get(k, 'finite')})")
        elif isinstance(v, str):
            if len(v) > 64 or any(ch in v for ch in "/\\:") or v.startswith("."):
                out.append(f"model_kwargs.{k} = {v!r}: only short names are allowed, not paths or URLs")
        else:
            out.append(f"model_kwargs.{k}: expected a number, a boolean or a short name, got {type(v).__name__}")
    return out


INFERENCE_KEYS = ("mode", "tolerance", "tome_r")


def _inference_problems(spec: WeightSpec) -> list[str]:
    """``inference`` holds a valid mode (or auto), a tolerance in [0, 0.1] and a token-merging r."""
    inf = spec.inference
    if not isinstance(inf, dict):
        return [f"inference must be a mapping with keys {list(INFERENCE_KEYS)}, got {type(inf).__name__}"]
    out = [f"inference.{k} is unknown; allowed: {list(INFERENCE_KEYS)}" for k in inf if k not in INFERENCE_KEYS]
    tol = inf.get("tolerance", 0.005)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= float(tol) <= 0.1:
        out.append(f"inference.tolerance must be a number in [0, 0.1] (an AUROC drop), got {tol!r}")
    r = inf.get("tome_r")
    values = r if isinstance(r, list | tuple) else [r]
    if r is not None and not (values and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 4096
                                             for v in values)):  # fmt: skip
        out.append(f"inference.tome_r must be a whole number of tokens (or one per block) in [0, 4096], got {r!r}")
    mode = inf.get("mode")
    if mode is not None and not out:
        from loupe.core.models.inference import mode_problem_text

        problem = mode_problem_text(str(mode), spec)
        if problem:
            out.append(f"inference.mode: {problem}")
    return out


def _rule_problem(key: str, rule: Any) -> str | None:
    """Why a ``scope`` rule is malformed, or None."""
    if rule is True or (isinstance(rule, list) and rule):
        return None
    if isinstance(rule, dict) and set(rule) <= {"min", "max"} and rule:
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in rule.values()):
            return None
    return f"scope rule {key!r}: expected a non-empty list of values, {{'min': a, 'max': b}} or true, got {rule!r}"


def _rule_broken(key: str, rule: Any, meta: dict[str, Any]) -> str | None:
    """How ``meta`` breaks the rule, or None when it keeps it."""
    value = meta.get(key)
    if rule is True:
        return None if value else f"{key} is {'missing' if value is None else repr(value)}"
    if value is None:
        return None
    if isinstance(rule, list):
        return None if value in rule else f"{key} is {value!r}, not one of {rule}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"{key} is {value!r}, not a number"
    lo, hi = rule.get("min", -math.inf), rule.get("max", math.inf)
    if lo <= v <= hi:
        return None
    if "min" in rule and "max" in rule:
        return f"{key} is {v:g}, outside [{lo:g}, {hi:g}]"
    return f"{key} is {v:g}, above the {hi:g} allowed" if v > hi else f"{key} is {v:g}, below the {lo:g} required"
