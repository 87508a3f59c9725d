"""Config sections and helpers shared by the CXR recipes (MAE pretraining, fine-tuning, linear probe, evaluation)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from loupe.core.config import flatten, to_dict
from loupe.core.data.dataset import collate_samples
from loupe.core.distributed import DistInfo, sampler_for
from loupe.core.errors import ConfigError
from loupe.core.models.spec import WeightSpec
from loupe.core.registry import LABEL_SETS, MODELS
from loupe.core.tracking import NullRun, Tracker
from loupe.domains.cxr.data import DataConfig, TensorImageDataset, load_pneumoniamnist
from loupe.domains.cxr.models import CXR_MEAN, CXR_STD, cxr_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """The network. ``init``: '' (random), a weight source (``file:``, ``local-dir:``, ``tag:``, ``hf-hub:``) or an
    MLflow URI (``runs:/ID/mae``, ``models:/NAME@alias``); ``init_layout`` says how its keys are laid out."""

    name: str = "cxr_vit_micro_patch4"
    img_size: int = 28
    in_chans: int = 1
    drop_path: float = 0.1
    init: str = ""
    init_layout: str = "mae"
    mean: tuple[float, ...] = CXR_MEAN
    std: tuple[float, ...] = CXR_STD

    def problems(self) -> list[str]:
        out = []
        if self.name not in MODELS:
            out.append(f"name: model {self.name!r} is not registered; see `loupe models --domain cxr`")
        if self.in_chans not in (1, 3):
            out.append(f"in_chans must be 1 or 3, got {self.in_chans}")
        if len(self.mean) == 1 and self.in_chans == 3:
            pass  # replicated below
        elif len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            out.append(f"mean/std need 1 or {self.in_chans} values")
        if self.init_layout not in ("mae", "timm", "loupe", "open_clip"):
            out.append(f"init_layout: expected mae, timm, loupe or open_clip, got {self.init_layout!r}")
        if not 0.0 <= self.drop_path < 1.0:
            out.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        return out

    def spec(self, name: str, label_names: tuple[str, ...], source: str | None = None) -> WeightSpec:
        c = self.in_chans
        return cxr_spec(
            name,
            self.name,
            label_names,
            img_size=self.img_size,
            in_chans=c,
            mean=tuple(self.mean) * (c // len(self.mean)),
            std=tuple(self.std) * (c // len(self.std)),
            source=source,
            layout=self.init_layout if source else "loupe",
            model_kwargs={"drop_path_rate": self.drop_path} if self.drop_path else {},
        )


@dataclass(frozen=True)
class OptimConfig:
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


def label_names(data: DataConfig) -> tuple[str, ...]:
    return tuple(LABEL_SETS.get(data.label_set))


def resolve_init(init: str, tracker: Tracker, workdir: Path) -> str | None:
    """An MLflow URI is downloaded to ``workdir`` and becomes a ``local-dir:``/``file:`` source; others pass through."""
    if not init:
        return None
    if init.startswith(("runs:/", "models:/")):
        local = tracker.resolve_model_uri(init, workdir)
        files = sorted(local.glob("*.safetensors")) if local.is_dir() else [local]
        if len(files) == 1:
            return f"file:{files[0]}"
        return f"local-dir:{local}"
    return init


# ----------------------------------------------------------------------------------------------------- datasets
def build_split(data: DataConfig, spec: WeightSpec, split: str) -> Dataset:
    """The ``split`` (train / val / test) of the configured source, through the spec's preprocessing."""
    if data.source == "pneumoniamnist":
        images, labels = load_pneumoniamnist(data.path, split, data.limit)
        return TensorImageDataset(images, labels, spec)
    from loupe.domains.cxr.manifests import manifest_split

    return manifest_split(data, spec, split)


def make_loader(ds: Dataset, data: DataConfig, info: DistInfo, *, train: bool, seed: int) -> DataLoader:
    """Batches in an order fixed by ``seed`` and the epoch; the loader's own generator leaves torch's RNG alone."""
    sampler = sampler_for(ds, info, shuffle=train, seed=seed, drop_last=train)
    return DataLoader(
        ds,
        batch_size=data.batch_size,
        sampler=sampler,
        drop_last=train and len(ds) >= data.batch_size * info.world_size,
        num_workers=data.num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_samples,  # reader metadata (None values, nested dicts) stays a list beside the tensors
    )


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray, list]:
    """Sigmoid scores ``[N, K]``, labels ``[N, K]`` and per-sample meta over a loader (model in eval mode)."""
    model.eval()
    scores, labels, metas = [], [], []
    for batch in loader:
        scores.append(torch.sigmoid(model(batch["image"].to(device)).float()).cpu())
        labels.append(batch["label"])
        metas.extend(batch["meta"])
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), metas


# ------------------------------------------------------------------------------------------------------ tracking
def log_config(run: Any, cfg: Any, recipe: str) -> None:
    run.log_params({"recipe": recipe, **flatten(to_dict(cfg))})
    run.log_dict(to_dict(cfg), "config.json")


@contextlib.contextmanager
def tracked_run(tracker: Tracker, cfg: Any, recipe: str, info: DistInfo):
    """The tracker's run on rank 0 (config logged), an in-memory `NullRun` on the other ranks."""
    if not info.is_main:
        yield NullRun()
        return
    name = cfg.run.name or recipe
    with tracker.run(name, cfg.run.experiment, tags={"recipe": recipe, "domain": "cxr"}) as run:
        log_config(run, cfg, recipe)
        yield run


def output_dir(cfg: Any, default: str) -> Path:
    out = Path(cfg.run.output_dir or Path("runs") / default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def signature(spec: WeightSpec) -> dict[str, Any]:
    """The model signature logged beside the weights: input and output tensor shapes and the label names."""
    c, h, w = spec.input_size
    return {
        "inputs": [{"name": "image", "type": "tensor", "dtype": "float32", "shape": [-1, c, h, w]}],
        "outputs": [
            {"name": "logits", "type": "tensor", "dtype": "float32", "shape": [-1, spec.num_outputs]},
        ],
        "label_names": list(spec.label_names),
        "preprocessing": spec.preprocessing(),
    }


def temp_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="loupe-cxr-")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
