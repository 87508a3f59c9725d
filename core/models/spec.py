"""`WeightSpec`: what a set of weights is, where it comes from and how inputs must be prepared for it.

Transforms are derived from the spec (``loupe.core.transforms``), so a chest X-ray model and a CLIP tower can
never get each other's normalisation. A spec travels with the weights as ``weight_spec.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loupe.core.errors import ConfigError, UnsupportedInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Task = Literal["multilabel", "multiclass", "binary", "embedding"]
Layout = Literal["loupe", "timm", "open_clip", "mae"]


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
    resize_mode: Literal["squash", "shorter_side_crop"] = "squash"
    label_names: tuple[str, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    domain: str = "core"
    version: str = "0"
    licence: str = "unspecified"
    description: str = ""
    modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source=f"weight spec {self.name!r}")

    def problems(self) -> list[str]:
        out = []
        c = self.input_size[0]
        if c not in (1, 3):
            out.append(f"input_size channels must be 1 or 3, got {c}")
        if len(self.mean) != c or len(self.std) != c:
            out.append(f"mean/std need {c} values for {c} channel(s), got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            out.append(f"std values must be > 0, got {self.std}")
        unknown = set(self.thresholds) - set(self.label_names)
        if unknown:
            out.append(f"thresholds name labels that are not in label_names: {sorted(unknown)}")
        for k, v in self.thresholds.items():
            if not 0.0 <= float(v) <= 1.0:
                out.append(f"threshold for {k!r} must be a probability in [0, 1], got {v}")
        bad = [m for m in self.modalities if not (isinstance(m, str) and m.isalnum() and m.isupper())]
        if bad:
            out.append(f"modalities must be DICOM modality codes in capitals (CR, DX, CT, ...), got {bad}")
        return out

    def check_scope(self, meta: dict[str, Any], path: str | Path) -> None:
        """Refuse a DICOM input whose modality is outside ``modalities`` (`UnsupportedInputError`)."""
        modality = str(meta.get("modality") or "").upper()
        if not self.modalities or not modality or modality in self.modalities:
            return
        raise UnsupportedInputError(
            f"{path}: DICOM modality {modality} is outside the scope of model {self.name!r}, which is meant for "
            f"{', '.join(self.modalities)} images; score it with a model made for {modality}, or, if this model "
            f"really applies, add {modality!r} to 'modalities' in its weight_spec.json"
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
        for k in ("input_size", "mean", "std", "label_names", "modalities"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"weight spec has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        for k in ("input_size", "mean", "std", "label_names", "modalities"):
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

    def preprocessing(self) -> dict[str, Any]:
        """The fields that decide how an input becomes a tensor (hashed into every prediction row)."""
        keys = ("input_size", "mean", "std", "intensity", "interpolation", "resize_mode")
        return {k: (list(v) if isinstance(v := getattr(self, k), tuple) else v) for k in keys}

    def preprocessing_hash(self) -> str:
        blob = json.dumps(self.preprocessing(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
