"""Masked-autoencoder pretraining on unlabelled images, shared by the domains' ``*.mae_pretrain`` recipes.

`MAEPretrainBase` owns the loop every domain runs the same way — the registered MAE model, AdamW with layer groups,
warm-up + cosine, the project's `Trainer` with checkpoints, the ``mae_loss`` per epoch in MLflow, and the encoder
saved as ``mae.safetensors`` beside a weight spec pointing at it. A domain's recipe supplies only what differs:
which images (``_images``), the spec of the encoder (``_spec``), the crops dataset (``_dataset``) and optionally a
batch augmentation (``_make_augment``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loupe.core.distributed import DistInfo, make_loader, pick_device
from loupe.core.errors import ConfigError
from loupe.core.models.spec import WeightSpec
from loupe.core.optim import WarmupCosine, adamw, param_groups
from loupe.core.recipes import Recipe
from loupe.core.registry import MODELS
from loupe.core.training import LoopConfig, Trainer

MAE_FILE = "mae.safetensors"


@dataclass(frozen=True)
class MAEModel:
    """``name``: a registered MAE model (``kind: mae``); ``img_size``: its input side in pixels."""

    name: str = ""
    img_size: int = 64
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def problems(self) -> list[str]:
        ok = self.name in MODELS and MODELS.entry(self.name).meta.get("kind") == "mae"
        out = [] if ok else [f"name: {self.name!r} is not a registered MAE model ({MODELS.names('*mae*')})"]
        if not 0.0 < self.mask_ratio < 1.0:
            out.append(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        return out


class MAEPretrainBase(Recipe):
    """The MAE loop (see the module docstring); ``cfg`` has ``run``, ``data`` (``batch_size``, optional
    ``num_workers``), ``model`` (`MAEModel`), ``optim`` and ``train`` (``epochs``, ``threads``, ``progress``)."""

    default_name = "mae"

    def _images(self) -> list[Path]:
        raise NotImplementedError

    def _spec(self, architecture: str) -> WeightSpec:
        raise NotImplementedError

    def _dataset(self, paths: list[Path]) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def _make_augment(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A batch augmentation on the normalised crops (after ``_spec``), or None."""
        return None

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.run.device)
        self.out = self.output_dir(cfg.run.name or self.default_name)
        paths = self._images()
        if not paths:
            raise ConfigError("the manifests hold no training images for MAE pretraining")
        self.spec = self._spec(cfg.model.name.replace("_mae_", "_"))  # path_mae_vit_x -> path_vit_x
        self.mae = MODELS.create(cfg.model.name, img_size=cfg.model.img_size, mask_ratio=cfg.model.mask_ratio,
                                 norm_pix_loss=cfg.model.norm_pix_loss).to(self.device)  # fmt: skip
        ds = self._dataset(paths)
        self.loader = make_loader(ds, DistInfo(), batch_size=cfg.data.batch_size,
                                  num_workers=getattr(cfg.data, "num_workers", 0), train=True,
                                  seed=cfg.run.seed)  # fmt: skip
        if len(self.loader) == 0:
            raise ConfigError(f"no full batch: {len(ds)} crops, data.batch_size {cfg.data.batch_size}")
        steps = cfg.train.epochs * len(self.loader)
        warm = min(steps, int(round(cfg.optim.warmup_epochs * len(self.loader))))
        opt = adamw(param_groups(self.mae, self.mae.backbone, weight_decay=cfg.optim.weight_decay), lr=cfg.optim.lr,
                    betas=(0.9, cfg.optim.beta2))  # fmt: skip
        device, augment = self.device, self._make_augment() or (lambda x: x)
        self.trainer = Trainer(self.mae, opt, lambda model, b: model(augment(b["image"].to(device)))[0],
                               schedule=WarmupCosine(cfg.optim.lr, steps, warm, cfg.optim.min_lr),
                               cfg=LoopConfig(cfg.train.epochs, progress=cfg.train.progress), device=device,
                               checkpoint_dir=self.out / "checkpoints")  # fmt: skip

    def train(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        t0 = time.time()
        with self.tracked_run() as run:
            self.trainer.fit(self.loader, on_epoch_end=lambda e, m: run.log_metrics({"mae_loss": m["train_loss"]},
                                                                                     step=e))  # fmt: skip
            path = self.out / MAE_FILE
            save_file(self.mae.mae_state_dict(), str(path))
            self.spec.replace(source=f"file:{path.resolve()}").save(self.out / "weight_spec.json")
            run.log_artifact(path, "mae")
            hist = self.trainer.state.history
            seconds = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": seconds})
            return {"run_id": run.run_id, "mae_checkpoint": str(path.resolve()), "first_loss": hist[0]["train_loss"],
                    "final_loss": hist[-1]["train_loss"], "train_seconds": seconds,
                    "n_images": len(getattr(self.loader.dataset, "paths", []))}  # fmt: skip

    def evaluate(self) -> dict[str, Any]:
        raise ConfigError(f"{self.name} trains; run it with `loupe train`")
