"""Resolve ``--model`` to weights, spec and provenance, whatever form it takes.

Accepted, in this order: ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/ID/model`` (through the
tracker's model registry), ``local-dir:/folder`` or ``file:/folder|file:/folder/weights.safetensors`` (a Loupe model
folder written by ``save_model``; ``file:/folder/X.pt`` loads X.pt itself, with the folder's spec), or a registered
weight tag (``loupe weights list``). A registered architecture without weights is refused: scoring random weights
would produce a table that looks real and means nothing.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loupe.core.errors import ConfigError
from loupe.core.io.identity import file_sha256
from loupe.core.models import Classifier, WeightSpec, build_model, load_model_dir, save_model
from loupe.core.models.weights import SPEC_FILE, find_weights_file, resolve_source
from loupe.core.registry import MODELS, WEIGHTS
from loupe.core.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """What every row records about the model that scored it."""

    domain: str
    model_name: str
    model_version: str
    model_source: str
    weights_sha256: str
    preprocessing_hash: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class ResolvedModel:
    """A model ready to score, its spec, a Loupe model folder holding it (for Ray actors) and its provenance."""

    model: Classifier
    spec: WeightSpec
    model_dir: Path
    provenance: Provenance
    _tmp: Any = None  # keeps a temporary folder alive as long as the resolved model

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def resolve_model(ref: str, domain: str, tracker: Tracker | None = None) -> ResolvedModel:
    """Load the model ``ref`` names and record where it came from; errors say which form to use."""
    if ref.startswith(("models:/", "runs:/")):
        return _from_registry(ref, domain, tracker)
    if ref.startswith(("local-dir:", "file:")):
        folder, weights = _model_folder(ref)
        model, spec = load_model_dir(weights or folder)
        if weights is None or weights.resolve() == find_weights_file(folder).resolve():
            return _resolved(model, spec, folder, domain, ref, spec.name, spec.version)
        # file:folder/X.pt names other weights than the folder's own: Ray actors get a folder holding exactly them
        tmp = tempfile.TemporaryDirectory(prefix="loupe-score-model-")
        res = _resolved(model, spec, save_model(model, spec, tmp.name), domain, ref, spec.name, spec.version, tmp)
        res.provenance = Provenance(**{**res.provenance.to_dict(), "weights_sha256": file_sha256(weights)})
        return res
    if ref in WEIGHTS:
        return _from_tag(ref, domain)
    if ref in MODELS:
        raise ConfigError(
            f"model {ref!r} is a registered architecture without trained weights; score a trained model: "
            f"models:/NAME@champion, local-dir:/path/to/model_folder, or a weight tag from `loupe weights list`"
        )
    if Path(ref).expanduser().exists():
        raise ConfigError(f"--model {ref!r} is a path; write local-dir:{ref} for a Loupe model folder")
    raise ConfigError(
        f"--model {ref!r} is not a weight tag, a model URI or a model folder; use models:/NAME@ALIAS, "
        f"runs:/RUN_ID/model, local-dir:/path/to/model_folder or a tag from `loupe weights list`"
    )


def _model_folder(ref: str) -> tuple[Path, Path | None]:
    """The model folder ``ref`` names and, for ``file:folder/X``, the weights file X itself."""
    p = Path(ref.partition(":")[2]).expanduser()
    folder = p.parent if p.is_file() else p
    if not (folder / SPEC_FILE).is_file():
        raise ConfigError(
            f"--model {ref!r}: {folder} is not a Loupe model folder (no {SPEC_FILE}); save one with "
            f"loupe.core.models.save_model, or score a registered model with models:/NAME@ALIAS"
        )
    return folder.resolve(), (p.resolve() if p.is_file() else None)


def _resolved(
    model: Classifier,
    spec: WeightSpec,
    folder: Path,
    domain: str,
    source: str,
    name: str,
    version: str,
    tmp: Any = None,
) -> ResolvedModel:
    if spec.task == "embedding" or not spec.label_names:
        raise ConfigError(f"model {name!r} has no labels (task {spec.task!r}); batch scoring needs a classifier")
    if spec.domain not in ("core", domain):
        raise ConfigError(
            f"model {name!r} belongs to domain {spec.domain!r}, not {domain!r}; run `loupe score {spec.domain} ...`"
        )
    prov = Provenance(
        domain=domain,
        model_name=name,
        model_version=str(version),
        model_source=source,
        weights_sha256=file_sha256(find_weights_file(folder)),
        preprocessing_hash=spec.preprocessing_hash(),
    )
    model.eval()
    return ResolvedModel(model, spec, folder, prov, tmp)


def _from_registry(ref: str, domain: str, tracker: Tracker | None) -> ResolvedModel:
    if tracker is None:
        raise ConfigError(f"--model {ref!r} needs the MLflow model registry; drop --no-track and set --tracking-uri")
    tmp = tempfile.TemporaryDirectory(prefix="loupe-score-model-")
    local = tracker.resolve_model_uri(ref, tmp.name)
    model, spec = load_model_dir(local)
    name, version = tracker.model_version(ref)
    return _resolved(model, spec, Path(local), domain, ref, name or spec.name, version or spec.version, tmp)


def _from_tag(tag: str, domain: str) -> ResolvedModel:
    spec = WEIGHTS.get(tag)
    if not isinstance(spec, WeightSpec):
        raise ConfigError(f"weight tag {tag!r} is registered without a WeightSpec; it cannot be scored")
    model, _ = build_model(spec)
    weights = find_weights_file(resolve_source(spec.source)) if spec.source else None
    if weights is None:
        raise ConfigError(f"weight tag {tag!r} has no source; it names an architecture without weights")
    tmp = tempfile.TemporaryDirectory(prefix="loupe-score-model-")
    folder = save_model(model, spec, tmp.name)  # the same weights as a Loupe folder, for Ray actors
    res = _resolved(model, spec, folder, domain, f"tag:{tag}", spec.name, spec.version, tmp)
    res.provenance = Provenance(**{**res.provenance.to_dict(), "weights_sha256": file_sha256(weights)})
    return res


# ------------------------------------------------------------------------------------------------ inference mode
#: Inputs of the run that ``--mode auto`` reads to check accuracy when the model folder stores no validation set.
AUTO_SAMPLE = 32


def apply_inference_mode(
    rm: ResolvedModel, mode: str | None = None, sample_paths: Sequence[str] = (), device: str = "cpu"
) -> ResolvedModel:
    """``rm`` with its model run in ``mode`` (default: the spec's ``inference.mode``, else fp32).

    ``auto`` measures the available modes against fp32 on this machine once per (CPU, torch, weights) and caches
    the pick (`loupe.core.models.auto_mode.auto_mode`); accuracy is checked on the model folder's stored
    validation set (``validation.safetensors``: AUROC drop) or, without one, on up to `AUTO_SAMPLE` of the run's
    own inputs (decision agreement with fp32). The mode actually used is written into the returned spec, so it is
    part of the preprocessing hash of every row. ``rm`` itself is left as it is (its owner still closes it).
    """
    from dataclasses import replace

    from loupe.core.models.auto_mode import auto_mode
    from loupe.core.models.inference import InferenceMode, with_mode

    requested = mode or str(rm.spec.inference.get("mode") or "fp32")
    if requested == "auto":
        choice = auto_mode(rm.model, rm.spec, lambda: _auto_inputs(rm, sample_paths),
                           weights_sha256=rm.provenance.weights_sha256, device=device)  # fmt: skip
        log.info("--mode auto picked %s (%s%s)", choice.mode, choice.evidence, ", cached" if choice.cached else "")
        requested = choice.mode
    parsed = InferenceMode.parse(requested, rm.spec)
    model = with_mode(rm.model, parsed, rm.spec, device)
    inference = {**rm.spec.inference, "mode": str(parsed)}
    if parsed.is_reference:
        inference.pop("mode")
    spec = rm.spec.replace(inference=inference)
    prov = replace(rm.provenance, preprocessing_hash=spec.preprocessing_hash())
    return ResolvedModel(model, spec, rm.model_dir, prov)  # no temporary folder: ``rm`` keeps owning it


def _auto_inputs(rm: ResolvedModel, sample_paths: Sequence[str]):
    """(model inputs, labels or None, what they are) for ``--mode auto`` to check accuracy on."""
    import torch

    from loupe.core.errors import LoupeError
    from loupe.core.io import read_any
    from loupe.core.models.auto_mode import VALIDATION_FILE, load_validation_set
    from loupe.core.transforms import ModelInput

    stored = load_validation_set(rm.model_dir, rm.spec)
    if stored is not None:
        return stored[0], stored[1], f"the model folder's {VALIDATION_FILE}"
    prep, images = ModelInput(rm.spec), []
    for p in list(sample_paths)[: AUTO_SAMPLE * 4]:
        try:
            img = read_any(p)
            images.append(prep(img.array, img.meta.get("bits_stored") or img.meta.get("bit_depth")))
        except (LoupeError, OSError, ValueError) as exc:  # a slide, a clip or a broken file: try the next
            log.debug("--mode auto: %s not used for the accuracy check: %s", p, exc)
        if len(images) >= AUTO_SAMPLE:
            break
    if not images:
        raise ConfigError(
            "--mode auto needs model inputs to check each mode's accuracy against fp32: the model folder stores no "
            f"{VALIDATION_FILE} and none of the run's inputs reads as a single image; store a validation set with "
            "loupe.core.models.auto_mode.save_validation_set(folder, images, labels), or pick a mode (--mode fp32)"
        )
    return torch.stack(images), None, f"{len(images)} of this run's inputs"
