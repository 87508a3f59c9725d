"""Recipes: ``setup → train / evaluate → cleanup``, configured by YAML → frozen dataclasses.

A recipe YAML names its recipe (``recipe: cxr.finetune``) and holds the body of the recipe's config class.
``load_recipe`` resolves the name through the registry, applies ``key=value`` overrides and validates everything
at once; the resolved config (a plain dict) is what gets logged.
"""

from __future__ import annotations

import contextlib
import logging
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from loupe.core import config as cfgmod
from loupe.core.errors import ConfigError
from loupe.core.registry import RECIPES, discover_domains
from loupe.core.tracking import NullRun, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a recipe run is tracked; shared by every recipe config as its ``run`` section."""

    experiment: str = "loupe"
    name: str = ""
    seed: int = 0
    output_dir: str = ""
    tracking_uri: str | None = None
    track: bool = True
    device: str = "auto"

    def problems(self) -> list[str]:
        ok = self.device in ("auto", "cpu") or self.device.startswith("cuda")
        return [] if ok else [f"device: expected auto, cpu or cuda[:N], got {self.device!r}"]


class Recipe(ABC):
    """Base of all recipes: small ``_setup_*`` steps in ``setup``, then ``train`` and/or ``evaluate``."""

    name: ClassVar[str]
    domain: ClassVar[str] = "core"
    config_cls: ClassVar[type]

    def __init__(self, cfg: Any, tracker: Tracker):
        self.cfg = cfg
        self.tracker = tracker

    @abstractmethod
    def setup(self) -> None: ...

    def train(self) -> dict[str, Any]:
        raise ConfigError(f"recipe {self.name!r} does not train; use `loupe evaluate`")

    def evaluate(self) -> dict[str, Any]:
        raise ConfigError(f"recipe {self.name!r} does not evaluate; use `loupe train`")

    def cleanup(self) -> None:
        return None

    @contextlib.contextmanager
    def tracked_run(self, info: Any = None):
        """The tracker's run (tagged with the recipe and its domain, the resolved config logged) on rank 0; an
        in-memory `NullRun` on the other ranks of a DDP job (``info``: their `DistInfo`)."""
        if info is not None and not info.is_main:
            yield NullRun()
            return
        tags = {"recipe": self.name, "domain": self.domain}
        with self.tracker.run(self.cfg.run.name or self.name, self.cfg.run.experiment, tags=tags) as run:
            log_config(run, self.cfg, self.name)
            yield run

    def output_dir(self, default: str) -> Path:
        """``run.output_dir`` or ``runs/<default>``, created."""
        out = Path(self.cfg.run.output_dir or Path("runs") / default)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def run(self, mode: str) -> dict[str, Any]:
        seed_everything(self.cfg.run.seed)
        self.setup()
        try:
            return self.train() if mode == "train" else self.evaluate()
        finally:
            self.cleanup()


def register_recipe(name: str, *, domain: str):
    """Class decorator: ``@register_recipe("cxr.finetune", domain="cxr")``."""

    def wrap(cls: type[Recipe]) -> type[Recipe]:
        cls.name, cls.domain = name, domain
        RECIPES.register(name, cls, domain=domain, doc=(cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return wrap


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[type[Recipe], Any]:
    """Read a recipe YAML, apply overrides, build and validate its config; raises one `ConfigError`."""
    data = cfgmod.apply_overrides(cfgmod.load_yaml(path), list(overrides))
    name = data.pop("recipe", None)
    if not name:
        raise ConfigError("missing top-level key 'recipe' (e.g. recipe: cxr.finetune); see `loupe models`", str(path))
    discover_domains()
    cls = RECIPES.get(str(name))
    cfg = cfgmod.build(cls.config_cls, data, source=str(path))
    return cls, cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - recipes are top-level entry points; seeding here is intended
    torch.manual_seed(seed)


def log_config(run: Any, cfg: Any, recipe: str) -> None:
    """The resolved config as flat params (``optim.lr``, ...) and as ``config.json``."""
    run.log_params({"recipe": recipe, **cfgmod.flatten(cfgmod.to_dict(cfg))})
    run.log_dict(cfgmod.to_dict(cfg), "config.json")


def resolve_init(init: str, tracker: Tracker, workdir: Path) -> str | None:
    """An MLflow URI (``runs:/ID/path``, ``models:/NAME@alias``) is downloaded to ``workdir`` and becomes a
    ``file:`` / ``local-dir:`` weight source; other sources pass through; '' means random init (None)."""
    if not init:
        return None
    if init.startswith(("runs:/", "models:/")):
        local = tracker.resolve_model_uri(init, workdir)
        files = sorted(local.glob("*.safetensors")) if local.is_dir() else [local]
        if len(files) == 1:
            return f"file:{files[0]}"
        return f"local-dir:{local}"
    return init


def model_signature(spec: Any) -> dict[str, Any]:
    """What is logged beside a model's weights: input and output tensor shapes, label names, preprocessing."""
    c, h, w = spec.input_size
    return {
        "inputs": [{"name": "image", "type": "tensor", "dtype": "float32", "shape": [-1, c, h, w]}],
        "outputs": [{"name": "logits", "type": "tensor", "dtype": "float32", "shape": [-1, spec.num_outputs]}],
        "named_outputs": list(spec.outputs),
        "label_names": list(spec.label_names),
        "preprocessing": spec.preprocessing(),
    }
