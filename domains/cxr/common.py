"""Config sections and helpers shared by the CXR recipes (MAE pretraining, fine-tuning, linear probe, evaluation);
the recipe plumbing every domain needs (tracked runs, loaders, evaluation tables) is in core."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset

from loupe.core.distributed import DistInfo, make_loader
from loupe.core.evaluation import EvalConfig
from loupe.core.models.spec import WeightSpec
from loupe.core.models.tome import token_merging_problems
from loupe.core.registry import LABEL_SETS, MODELS
from loupe.domains.cxr.data import DataConfig, TensorImageDataset, load_pneumoniamnist
from loupe.domains.cxr.models import CXR_MEAN, CXR_STD, cxr_spec

log = logging.getLogger(__name__)

#: The subgroups a chest-film evaluation reports ("Fairness and Robustness of CLIP-Based Models for Chest X-rays").
CXR_SUBGROUPS = ("sex", "age_band", "view")


def cxr_eval(**changes) -> EvalConfig:
    return EvalConfig(subgroups=CXR_SUBGROUPS, **changes)


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
    token_merging: str = ""  # e.g. tome8: fine-tune with token merging (`loupe.core.models.tome`); '' = every token

    def problems(self) -> list[str]:
        out = token_merging_problems(self.token_merging)
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


def label_names(data: DataConfig) -> tuple[str, ...]:
    return tuple(LABEL_SETS.get(data.label_set))


# ----------------------------------------------------------------------------------------------------- datasets
def build_split(data: DataConfig, spec: WeightSpec, split: str) -> Dataset:
    """The ``split`` (train / val / test) of the configured source, through the spec's preprocessing."""
    if data.source == "pneumoniamnist":
        images, labels = load_pneumoniamnist(data.path, split, data.limit)
        return TensorImageDataset(images, labels, spec)
    from loupe.domains.cxr.manifests import manifest_split

    return manifest_split(data, spec, split)


def loader(ds: Dataset, data: DataConfig, info: DistInfo, *, train: bool, seed: int) -> DataLoader:
    """`loupe.core.distributed.make_loader` with the data section's batch size and workers."""
    return make_loader(ds, info, batch_size=data.batch_size, num_workers=data.num_workers, train=train, seed=seed)
