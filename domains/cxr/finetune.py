"""Multi-label fine-tuning (``cxr.finetune``) and the linear probe (``cxr.linear_probe``).

From an MAE checkpoint (ours, facebook's or the medical-MAE release: ``model.init`` + ``init_layout: mae``) or
random init: layer-wise LR decay, DropPath, RandAug-like batch augmentation, warm-up + cosine, AMP where
available, optional EMA, masked BCE (NaN labels ignored), optional class balancing and label smoothing. The
checkpoint with the best validation macro AUROC is kept; operating thresholds are chosen on validation and stored
in the weight spec; the test set is scored once, at the end. Runs under ``torchrun`` (DDP) unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loupe.core import distributed as dist
from loupe.core.distributed import pick_device
from loupe.core.errors import ConfigError
from loupe.core.evaluation import EvalConfig, choose_thresholds, evaluation_report, log_report, predict
from loupe.core.models.classifier import build_model, save_model
from loupe.core.models.tome import fine_tune_with_merging
from loupe.core.optim import OptimConfig, WarmupCosine, adamw, param_groups
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.training import LoopConfig, Trainer
from loupe.domains.cxr.common import ModelConfig, build_split, cxr_eval, label_names, loader
from loupe.domains.cxr.data import BatchAugment, DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Loop and regularisation. ``resume``: a checkpoint folder, ``auto`` (this run's last one, if any) or ''."""

    epochs: int = 12
    grad_clip: float = 0.0
    amp: str = "auto"
    ema_decay: float = 0.0
    checkpoint_every: int = 0
    resume: str = ""
    randaug_magnitude: float = 0.5
    crop_scale: tuple[float, float] = (0.75, 1.0)
    label_smoothing: float = 0.0
    class_balanced: bool = False
    freeze_backbone: bool = False
    threads: int = 0
    register_as: str = ""
    register_alias: str = "candidate"
    progress: bool = True

    def problems(self) -> list[str]:
        out = LoopConfig(self.epochs, self.grad_clip, self.amp, self.ema_decay, self.checkpoint_every).problems()
        if not 0.0 <= self.randaug_magnitude <= 1.0:
            out.append(f"randaug_magnitude must be in [0, 1], got {self.randaug_magnitude}")
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            out.append(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return out


@dataclass(frozen=True)
class FinetuneConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="cxr"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=cxr_eval)


def masked_bce(
    logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None, smoothing: float = 0.0
) -> torch.Tensor:
    """Binary cross-entropy averaged over the known labels only (NaN = unknown contributes nothing)."""
    known = ~torch.isnan(labels)
    y = torch.nan_to_num(labels, nan=0.0)
    if smoothing:
        y = y * (1.0 - smoothing) + 0.5 * smoothing
    loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def balanced_pos_weight(labels: np.ndarray) -> torch.Tensor:
    """Per-label ``negatives / positives`` over the known training labels (clamped to 0.1..100)."""
    pos = np.nansum(labels == 1, axis=0).astype(float)
    neg = np.nansum(labels == 0, axis=0).astype(float)
    return torch.tensor(np.clip(neg / np.maximum(pos, 1.0), 0.1, 100.0), dtype=torch.float32)


@register_recipe("cxr.finetune", domain="cxr")
class FinetuneRecipe(Recipe):
    """Multi-label fine-tuning from an MAE checkpoint or random init, evaluated with CIs and subgroup tables."""

    config_cls = FinetuneConfig
    default_name = "cxr_finetune"

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.info = dist.init_from_env(pick_device(cfg.run.device))
        self.device = dist.device_for(self.info, pick_device(cfg.run.device))
        self.out = self.output_dir(cfg.run.name or self.default_name)
        self.names = label_names(cfg.data)
        self._setup_model()
        self._setup_data()
        self._setup_optimizer()

    def _setup_model(self) -> None:
        cfg = self.cfg
        source = resolve_init(cfg.model.init, self.tracker, self.out / "init")
        self.spec = cfg.model.spec(cfg.run.name or self.default_name, self.names, source)
        model, report = build_model(self.spec)
        self.load_report = report.summary() if report else "random init"
        self.spec = fine_tune_with_merging(model, self.spec, cfg.model.token_merging)
        if cfg.train.freeze_backbone:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        self.model = model.to(self.device)
        self.ddp_model = dist.wrap_ddp(self.model, self.info, self.device)

    def _setup_data(self) -> None:
        cfg, seed = self.cfg, self.cfg.run.seed
        self.train_ds = build_split(cfg.data, self.spec, "train")
        self.augment = BatchAugment.randaug(self.spec, cfg.train.randaug_magnitude, cfg.train.crop_scale)
        self.train_dl = loader(self.train_ds, cfg.data, self.info, train=True, seed=seed)
        val_ds = build_split(cfg.data, self.spec, "val")
        self.val_dl = loader(val_ds, cfg.data, dist.DistInfo(), train=False, seed=0)
        if len(self.train_dl) == 0:
            raise ConfigError(f"no full training batch: {len(self.train_ds)} samples, batch_size {cfg.data.batch_size}")

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        groups = param_groups(
            self.model, self.model.backbone, weight_decay=cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay
        )
        self.optimizer = adamw(groups, lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2))
        steps = cfg.train.epochs * len(self.train_dl)
        warm = min(steps, int(round(cfg.optim.warmup_epochs * len(self.train_dl))))
        schedule = WarmupCosine(cfg.optim.lr, steps, warm, cfg.optim.min_lr)
        pos_weight = balanced_pos_weight(self._train_labels()).to(self.device) if cfg.train.class_balanced else None
        smoothing, device, augment = cfg.train.label_smoothing, self.device, self.augment

        def loss_fn(model, batch):
            x = augment(batch["image"].to(device))
            return masked_bce(model(x), batch["label"].to(device), pos_weight, smoothing)

        t = cfg.train
        loop = LoopConfig(t.epochs, t.grad_clip, t.amp, t.ema_decay, t.checkpoint_every, progress=t.progress)
        self.trainer = Trainer(
            self.ddp_model,
            self.optimizer,
            loss_fn,
            schedule=schedule,
            cfg=loop,
            device=self.device,
            checkpoint_dir=self.out / "checkpoints",
            is_main=self.info.is_main,
        )
        resume = self.out / "checkpoints" / "last" if t.resume == "auto" else Path(t.resume) if t.resume else None
        if resume is not None and (t.resume != "auto" or resume.is_dir()):
            self.trainer.load_checkpoint(resume)

    def _train_labels(self) -> np.ndarray:
        ds = self.train_ds
        if hasattr(ds, "labels") and isinstance(ds.labels, np.ndarray):
            return ds.labels
        return ds._targets.numpy()  # ManifestDataset

    # ---------------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        t0 = time.time()
        with self.tracked_run(self.info) as run:
            run.set_tags({"init": self.cfg.model.init or "random", "weights_load": self.load_report[:250]})
            self.trainer.fit(self.train_dl, on_epoch_end=lambda e, m: self._end_epoch(run, e, m))
            steps = self.trainer.state.step
            ddp = dist.replica_report(self.ddp_model, steps, steps * self.cfg.data.batch_size, self.info)
            if not self.info.is_main:
                return {"rank": self.info.rank}
            run.log_metrics(ddp)
            result = self._finish(run)
            result |= ddp
            result["train_seconds"] = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": result["train_seconds"]})
            return result

    def _eval_model(self):
        return self.trainer.ema.applied(self.model) if self.trainer.ema else contextlib.nullcontext(self.model)

    def _end_epoch(self, run, epoch: int, metrics: dict[str, float]) -> dict[str, float]:
        if not self.info.is_main:
            return {}
        from loupe.core.metrics import macro_auroc

        with self._eval_model() as model:
            S, Y, _ = predict(model, self.val_dl, self.device)
            val = float(macro_auroc(Y, S))
            state = self.trainer.state
            if state.best is None or val > state.best:
                state.best, state.best_epoch = val, epoch
                save_model(model, self.spec, self.out / "best")
        out = {"val_macro_auroc": val, "lr": self.optimizer.param_groups[-1]["lr"]}
        run.log_metrics({**metrics, **out}, step=epoch)
        log.info("epoch %d: train loss %.4f, val macro AUROC %.4f", epoch, metrics["train_loss"], val)
        return out

    def _finish(self, run) -> dict[str, Any]:
        """Best checkpoint → thresholds on validation → test report → model + signature logged and registered."""
        from safetensors.torch import load_file

        model = self.model
        model.load_state_dict(load_file(str(self.out / "best" / "weights.safetensors")))
        S_val, Y_val, _ = predict(model, self.val_dl, self.device)
        thresholds = choose_thresholds(Y_val, S_val, self.names, self.cfg.eval)
        spec = self.spec.replace(thresholds=thresholds, source=None, layout="loupe")
        test_ds = build_split(self.cfg.data, spec, "test")
        test_dl = loader(test_ds, self.cfg.data, dist.DistInfo(), train=False, seed=0)
        S, Y, _ = predict(model, test_dl, self.device)
        from loupe.domains.cxr.manifests import subgroup_frame

        meta = subgroup_frame(test_ds)
        groups = meta["group"].to_numpy() if "group" in meta else None  # patient-level (cluster) bootstrap CIs
        report = evaluation_report(Y, S, self.names, cfg=self.cfg.eval, thresholds=thresholds, meta=meta, groups=groups)
        log_report(run, report, self.out / "evaluation")
        model_dir = save_model(model, spec, self.out / "model")
        run.log_dict(model_signature(spec), "model/signature.json")
        run.log_model_dir(model_dir)
        version = None
        if self.cfg.train.register_as:
            version = self.tracker.register_model(self.cfg.train.register_as, run.run_id, self.cfg.train.register_alias)
        st = self.trainer.state
        return {
            "run_id": run.run_id,
            "best_epoch": st.best_epoch,
            "val_macro_auroc": st.best,
            "test_macro_auroc": report.metrics["test_macro_auroc"],
            "test_macro_auroc_ci": [report.metrics[f"test_macro_auroc_ci_{k}"] for k in ("low", "high")],
            "thresholds": thresholds,
            "model_dir": str(model_dir),
            "registered_version": version,
            "weights_load": self.load_report,
        }

    def cleanup(self) -> None:
        dist.cleanup(getattr(self, "info", dist.DistInfo()))


@dataclass(frozen=True)
class ProbeConfig(FinetuneConfig):
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, layer_decay=1.0, weight_decay=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(freeze_backbone=True, randaug_magnitude=0.0))

    def problems(self) -> list[str]:
        return [] if self.train.freeze_backbone else ["train.freeze_backbone must be true for a linear probe"]


@register_recipe("cxr.linear_probe", domain="cxr")
class LinearProbeRecipe(FinetuneRecipe):
    """Linear probe: the backbone frozen, only the head trained; the comparison point for fine-tuning."""

    config_cls = ProbeConfig
    default_name = "cxr_linear_probe"


def main(argv: list[str] | None = None, mode: str = "train") -> dict[str, Any]:
    """Run any CXR recipe YAML in-process (``python -m loupe.domains.cxr.run CFG.yaml [k=v ...]``).

    What tests and ``torchrun`` call; ``mode`` is ``train`` or ``evaluate``.
    """
    from loupe.core.recipes import load_recipe
    from loupe.core.tracking import make_tracker

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise ConfigError("usage: python -m loupe.domains.cxr.run CONFIG.yaml [key=value ...]")
    cls, cfg = load_recipe(argv[0], argv[1:])
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 opens the tracking store
    return cls(cfg, make_tracker(cfg.run.tracking_uri, enabled=cfg.run.track and rank0)).run(mode)
