"""MAE pretraining on chest films (``cxr.mae_pretrain``), after "Delving into Masked Autoencoders for Multi-Label
Thorax Disease Classification": 90 % of patches masked, random-resized crops of 0.5–1.0 of the film, normalised-
pixel loss, a light decoder. Writes ``mae.safetensors`` in the published MAE layout (timm encoder keys +
``decoder_*``), which ``cxr.finetune`` loads with ``model.init: file:<out>/mae.safetensors`` and
``init_layout: mae``; checkpoints every N steps and resumes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loupe.core import distributed as dist
from loupe.core.distributed import pick_device
from loupe.core.errors import ConfigError
from loupe.core.optim import WarmupCosine, adamw, param_groups
from loupe.core.recipes import Recipe, RunConfig, register_recipe
from loupe.core.registry import MODELS
from loupe.core.training import LoopConfig, Trainer, unwrap
from loupe.domains.cxr.common import build_split, loader
from loupe.domains.cxr.data import BatchAugment, DataConfig
from loupe.domains.cxr.models import CXR_MEAN, CXR_STD, cxr_spec

log = logging.getLogger(__name__)
MAE_FILE = "mae.safetensors"


@dataclass(frozen=True)
class MAEModelConfig:
    name: str = "cxr_mae_vit_micro_patch4"
    img_size: int = 28
    in_chans: int = 1
    mask_ratio: float = 0.9
    norm_pix_loss: bool = True
    decoder_dim: int = 0  # 0 = the registered model's default
    decoder_depth: int = 0
    decoder_heads: int = 0
    mean: tuple[float, ...] = CXR_MEAN
    std: tuple[float, ...] = CXR_STD

    def problems(self) -> list[str]:
        out = []
        if self.name not in MODELS or MODELS.entry(self.name).meta.get("kind") != "mae":
            mae = ", ".join(n for n in MODELS.names("*mae*"))
            out.append(f"name: {self.name!r} is not a registered MAE model; use one of: {mae}")
        if not 0.0 <= self.mask_ratio < 1.0:
            out.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        return out

    def build(self):
        kw = {k: getattr(self, k) for k in ("decoder_dim", "decoder_depth", "decoder_heads") if getattr(self, k)}
        return MODELS.create(
            self.name,
            in_chans=self.in_chans,
            img_size=self.img_size,
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
            **kw,
        )


@dataclass(frozen=True)
class PretrainOptim:
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    beta2: float = 0.95


@dataclass(frozen=True)
class PretrainLoop:
    epochs: int = 30
    crop_scale: tuple[float, float] = (0.5, 1.0)
    grad_clip: float = 0.0
    amp: str = "auto"
    checkpoint_every: int = 0
    resume: str = ""
    threads: int = 0
    progress: bool = True

    def problems(self) -> list[str]:
        out = LoopConfig(self.epochs, self.grad_clip, self.amp, 0.0, self.checkpoint_every).problems()
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            out.append(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return out


@dataclass(frozen=True)
class PretrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="cxr"))
    data: DataConfig = field(default_factory=DataConfig)
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    train: PretrainLoop = field(default_factory=PretrainLoop)


@register_recipe("cxr.mae_pretrain", domain="cxr")
class MAEPretrainRecipe(Recipe):
    """Masked-autoencoder pretraining on the training films (labels unused)."""

    config_cls = PretrainConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.info = dist.init_from_env(pick_device(cfg.run.device))
        self.device = dist.device_for(self.info, pick_device(cfg.run.device))
        self.out = self.output_dir(cfg.run.name or "cxr_mae_pretrain")
        c = cfg.model.in_chans
        self.spec = cxr_spec(
            cfg.run.name or "cxr_mae",
            cfg.model.name.replace("cxr_mae_vit", "cxr_vit"),
            (),
            img_size=cfg.model.img_size,
            in_chans=c,
            mean=tuple(cfg.model.mean) * (c // len(cfg.model.mean)),
            std=tuple(cfg.model.std) * (c // len(cfg.model.std)),
            task="embedding",
            layout="mae",
        )
        self.mae = cfg.model.build().to(self.device)
        ddp = dist.wrap_ddp(self.mae, self.info, self.device)
        ds = build_split(cfg.data, self.spec, "train")
        self.augment = BatchAugment.mae(self.spec, cfg.train.crop_scale)
        self.loader = loader(ds, cfg.data, self.info, train=True, seed=cfg.run.seed)
        if len(self.loader) == 0:
            raise ConfigError(f"no full training batch: {len(ds)} samples, batch_size {cfg.data.batch_size}")
        self._setup_trainer(ddp)

    def _setup_trainer(self, ddp) -> None:
        cfg, device, augment = self.cfg, self.device, self.augment
        opt = adamw(param_groups(self.mae, self.mae.backbone, weight_decay=cfg.optim.weight_decay), lr=cfg.optim.lr,
                    betas=(0.9, cfg.optim.beta2))  # fmt: skip
        steps = cfg.train.epochs * len(self.loader)
        warm = min(steps, int(round(cfg.optim.warmup_epochs * len(self.loader))))
        t = cfg.train
        self.trainer = Trainer(
            ddp,
            opt,
            lambda model, batch: model(augment(batch["image"].to(device)))[0],
            schedule=WarmupCosine(cfg.optim.lr, steps, warm, cfg.optim.min_lr),
            cfg=LoopConfig(t.epochs, t.grad_clip, t.amp, 0.0, t.checkpoint_every, progress=t.progress),
            device=device,
            checkpoint_dir=self.out / "checkpoints",
            is_main=self.info.is_main,
        )
        resume = self.out / "checkpoints" / "last" if t.resume == "auto" else t.resume
        if resume and (t.resume != "auto" or resume.is_dir()):
            self.trainer.load_checkpoint(resume)

    def train(self) -> dict[str, Any]:
        t0 = time.time()
        with self.tracked_run(self.info) as run:

            def end(epoch: int, metrics: dict[str, float]) -> None:
                run.log_metrics({"mae_loss": metrics["train_loss"]}, step=epoch)
                log.info("epoch %d: MAE loss %.4f", epoch, metrics["train_loss"])

            self.trainer.fit(self.loader, on_epoch_end=end)
            dist.barrier(self.info)
            if not self.info.is_main:
                return {"rank": self.info.rank}
            return self._finish(run, time.time() - t0)

    def _finish(self, run, seconds: float) -> dict[str, Any]:
        from safetensors.torch import save_file

        mae = unwrap(self.mae)
        path = self.out / MAE_FILE
        save_file(mae.mae_state_dict(), str(path))
        self.spec.replace(source=f"file:{path.resolve()}").save(self.out / "weight_spec.json")
        run.log_artifact(path, "mae")
        run.log_artifact(self.out / "weight_spec.json", "mae")
        run.log_figure(reconstruction_figure(mae, self.loader, self.device), "mae/reconstructions.png")
        run.log_metrics({"wall_seconds": round(seconds, 1)})
        hist = self.trainer.state.history
        return {
            "run_id": run.run_id,
            "mae_checkpoint": str(path.resolve()),
            "final_loss": hist[-1]["train_loss"] if hist else None,
            "first_loss": hist[0]["train_loss"] if hist else None,
            "train_seconds": round(seconds, 1),
        }

    def cleanup(self) -> None:
        dist.cleanup(getattr(self, "info", dist.DistInfo()))


@torch.no_grad()
def reconstruction_figure(mae, loader, device, n: int = 6):
    """Input, masked input and reconstruction (visible patches pasted back) for ``n`` training films."""
    from matplotlib.figure import Figure

    from loupe.core.models.mae import patchify, unpatchify

    mae.eval()
    x = next(iter(loader))["image"][:n].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    _, pred, mask = mae(x, generator=g)
    p, c, grid = mae.patch_size, x.shape[1], mae.backbone.grid_size(x)
    target = patchify(x, p)
    if mae.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics, for display
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask[..., None]
    masked = unpatchify(target * (1 - m), p, c, grid)
    recon = unpatchify(target * (1 - m) + pred * m, p, c, grid)
    fig = Figure(figsize=(2 * n, 6), layout="constrained")
    axes = fig.subplots(3, n, squeeze=False)
    for i in range(n):
        for row, img in enumerate((x, masked, recon)):
            axes[row][i].imshow(img[i, 0].float().cpu().numpy(), cmap="gray")
            axes[row][i].axis("off")
    fig.suptitle(f"MAE: input / masked {mae.cfg.mask_ratio:.0%} / reconstruction")
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from loupe.domains.cxr.finetune import main as run_main

    return run_main(list(sys.argv[1:] if argv is None else argv))
