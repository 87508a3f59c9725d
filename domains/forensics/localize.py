"""Manipulation localisation (``forensics.localize``): where in a picture was it edited, at CPU size.

The model and its loss are in `loupe.domains.forensics.localizer` (a multi-scale decoder over the shared
Backbone, after IML-ViT); the data sources and metrics in `loupe.domains.forensics.masks`.

Training: BCE + Dice on the mask, BCE on the ground truth's boundary band (dilated minus eroded, ``edge_width`` px:
where localisers are vaguest) weighted by ``edge_weight``, and BCE on the image score. The checkpoint with the best
validation pixel F1 is kept; its validation-chosen mask and image thresholds are stored in the model. Evaluation per
test set (the held-out split, and every ``data.cross`` set whole): pixel F1 / IoU of tampered images at 0.5, at the
validation threshold, and at each image's best threshold (an optimistic oracle), the false-positive area on authentic
images, image-level AUROC with bootstrap CIs, and the same for two baselines in the same run: the all-tampered mask
and a noise-residual inconsistency map. Each image's mask is written as a 16-bit PNG; a few overlays are logged.

Data: a manifest ``path, mask[, label, split, group]`` (``data.manifest=...``; ``mask`` a binary PNG, white =
tampered, empty for authentic images) or the shared layouts (`SOURCES`: ``casia1``, ``casia2``, ``noso``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models.classifier import build_model, save_model
from loupe.core.optim import OptimConfig, WarmupCosine, adamw, param_groups
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.registry import MODELS
from loupe.core.training import LoopConfig, Trainer
from loupe.domains.forensics.localizer import LABEL, PYRAMID, LossWeights, localization_loss, localize_spec
from loupe.domains.forensics.masks import (
    BASELINES,
    SOURCES,
    Augment,
    MaskedImages,
    _collate,
    assign_splits,
    localization_metrics,
    overlay_figure,
    read_mask_manifest,
    topk_mean,
)

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class LocalizeData:
    """``manifest``: ``path, mask[, label, split, group]`` (paths relative to its folder or ``image_root``); '' =
    the shared layouts named in ``sources`` (under ``shared_root``). ``cross``: sets evaluated whole after training
    (source names or manifest paths): cross-dataset figures. Without a split column a seeded split by group holds
    out ``test_fraction``, then ``val_fraction`` of train for validation."""

    manifest: str = ""
    sources: tuple[str, ...] = ("casia1", "casia2")
    cross: tuple[str, ...] = ("noso",)
    shared_root: str = "../shared/data/forensics"
    image_root: str = ""
    test_fraction: float = 0.25
    val_fraction: float = 0.15
    batch_size: int = 8
    num_workers: int = 0

    def problems(self) -> list[str]:
        out = [f"sources: {s!r} is not a known layout ({sorted(SOURCES)})" for s in self.sources if s not in SOURCES]
        out += [f"cross: {c!r} is neither a known layout ({sorted(SOURCES)}) nor a .csv / .parquet manifest"
                for c in self.cross if c not in SOURCES and not c.endswith((".csv", ".parquet"))]  # fmt: skip
        if not self.manifest and not self.sources:
            out.append("give data.manifest or at least one of data.sources")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            out.append(f"test_fraction and val_fraction must be in (0, 1), got {self.test_fraction}, "
                       f"{self.val_fraction}")  # fmt: skip
        if self.batch_size < 1 or self.num_workers < 0:
            out.append("batch_size must be >= 1 and num_workers >= 0")
        return out


@dataclass(frozen=True)
class LocalizeModel:
    """``init``: '' (random), a weight source or MLflow URI (an MAE checkpoint of the encoder: ``init_layout: mae``);
    ``levels``: blocks the decoder reads (evenly spaced, the last included); ``topk_fraction``: share of the mask's
    highest logits the image score averages."""

    name: str = "forensics_loc_vit_micro_patch8"
    img_size: int = 128
    levels: int = 4
    decoder_dim: int = 64
    topk_fraction: float = 0.02
    drop_path: float = 0.0
    init: str = ""
    init_layout: str = "mae"

    def problems(self) -> list[str]:
        ok = self.name in MODELS and MODELS.entry(self.name).meta.get("kind") == "localizer"
        out = [] if ok else [f"name: {self.name!r} is not a registered localiser ({MODELS.names('forensics_loc_*')})"]
        if self.img_size < 16 or self.img_size % 16:
            out.append(f"img_size must be a multiple of 16 (patch grids of 8 and 16 px), got {self.img_size}")
        if not 1 <= self.levels <= len(PYRAMID) or self.decoder_dim < 8 or self.decoder_dim % 8:
            out.append(f"levels must be in [1, {len(PYRAMID)}] and decoder_dim a multiple of 8, got {self.levels}, "
                       f"{self.decoder_dim}")  # fmt: skip
        if not 0.0 < self.topk_fraction <= 1.0 or not 0.0 <= self.drop_path < 1.0:
            out.append(f"topk_fraction must be in (0, 1] and drop_path in [0, 1), got {self.topk_fraction}, "
                       f"{self.drop_path}")  # fmt: skip
        if self.init_layout not in ("mae", "timm", "loupe"):
            out.append(f"init_layout: expected mae, timm or loupe, got {self.init_layout!r}")
        return out


@dataclass(frozen=True)
class LocalizeTrain:
    epochs: int = 40
    loss: LossWeights = field(default_factory=LossWeights)
    augment: Augment = field(default_factory=Augment)
    grad_clip: float = 1.0
    amp: str = "auto"
    threads: int = 0
    progress: bool = True
    max_seconds: float = 0.0
    register_as: str = ""
    register_alias: str = "candidate"

    def problems(self) -> list[str]:
        w = self.loss
        out = [] if min(w.dice, w.edge, w.image) >= 0 and w.edge_width >= 1 else [
            f"loss weights must be >= 0 and edge_width >= 1, got {w}"]  # fmt: skip
        return out + LoopConfig(self.epochs, self.grad_clip, self.amp, max_seconds=self.max_seconds).problems()


@dataclass(frozen=True)
class LocalizeEval:
    """``baselines``: the all-tampered and noise-residual maps scored beside the model; ``overlays``: overlay figures
    logged per set (tampered images first); ``write_masks``: each evaluated image's mask as a 16-bit PNG."""

    n_boot: int = 1000
    alpha: float = 0.05
    baselines: bool = True
    overlays: int = 4
    write_masks: bool = True

    def problems(self) -> list[str]:
        ok = self.n_boot >= 1 and 0.0 < self.alpha < 1.0 and self.overlays >= 0
        return [] if ok else [f"n_boot must be >= 1, alpha in (0, 1), overlays >= 0; got {self.n_boot}, "
                              f"{self.alpha}, {self.overlays}"]  # fmt: skip


@dataclass(frozen=True)
class LocalizeConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="forensics-localize"))
    data: LocalizeData = field(default_factory=LocalizeData)
    model: LocalizeModel = field(default_factory=LocalizeModel)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=1.0,
                                                                   warmup_epochs=2))  # fmt: skip
    train: LocalizeTrain = field(default_factory=LocalizeTrain)
    eval: LocalizeEval = field(default_factory=LocalizeEval)


# --------------------------------------------------------------------------------------------------- the recipe
THRESHOLD_GRID = np.round(np.arange(0.05, 0.96, 0.05), 2)


@dataclass
class Fitted:
    """The kept checkpoint: model, epoch, validation F1 at its mask threshold, the thresholds, each epoch's loss."""

    model: nn.Module
    best_epoch: int
    val_f1: float
    mask_threshold: float
    image_threshold: float
    losses: list[float]


@register_recipe("forensics.localize", domain="forensics")
class LocalizeRecipe(Recipe):
    """Manipulation localisation: multi-block ViT features → pyramid decoder → pixel mask and image score."""

    config_cls = LocalizeConfig
    default_name = "forensics_localize"

    def setup(self) -> None:
        from loupe.core.distributed import pick_device

        cfg, d, m = self.cfg, self.cfg.data, self.cfg.model
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.run.device)
        self.out = self.output_dir(cfg.run.name or self.default_name)
        frame = self._load(d.manifest) if d.manifest else pd.concat([self._load(s) for s in d.sources])
        self.frame = assign_splits(frame, d.test_fraction, d.val_fraction, cfg.run.seed)
        self.cross = {Path(c).stem if c not in SOURCES else c: self._load(c) for c in d.cross}
        self.source = resolve_init(m.init, self.tracker, self.out / "init")
        kwargs: dict[str, Any] = {"levels": m.levels, "decoder_dim": m.decoder_dim, "topk_fraction": m.topk_fraction}
        if m.drop_path:
            kwargs["drop_path_rate"] = m.drop_path
        self.spec = localize_spec(cfg.run.name or self.default_name, m.name, img_size=m.img_size, source=self.source,
                                  layout=m.init_layout if self.source else "loupe", model_kwargs=kwargs)  # fmt: skip

    def _load(self, item: str) -> pd.DataFrame:
        """A source layout (converted under ``<out>/data``) or a manifest, as rows with ``Manipulated``."""
        if item not in SOURCES:
            return read_mask_manifest(item, self.cfg.data.image_root or None)
        adapter, sub = SOURCES[item]
        folder = Path(self.cfg.data.shared_root) / sub
        if not folder.is_dir():
            raise ConfigError(f"data source {item!r}: {folder} does not exist; set data.shared_root to the folder "
                              f"holding {sub}, or pass data.manifest=PATH")  # fmt: skip
        frame = adapter(folder, self.out / "data" / item)
        return frame.assign(**{LABEL: frame["label"].astype(float)})

    def _loader(self, ds: torch.utils.data.Dataset, train: bool) -> torch.utils.data.DataLoader:
        from loupe.core.distributed import DistInfo, sampler_for

        d = self.cfg.data
        return torch.utils.data.DataLoader(ds, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=_collate,
                                           sampler=sampler_for(ds, DistInfo(), shuffle=train, seed=self.cfg.run.seed),
                                           drop_last=train and len(ds) > d.batch_size)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ training
    def fit(self, run) -> Fitted:
        cfg, o = self.cfg, self.cfg.optim
        model, report = build_model(self.spec)
        self.load_report = report.summary() if report is not None else "random init"
        model = model.to(self.device)
        split = self.frame["split"]
        train_dl = self._loader(MaskedImages(self.frame[split == "train"], self.spec, cfg.train.augment), True)
        val_dl = self._loader(MaskedImages(self.frame[split == "val"], self.spec), False)
        opt = adamw(param_groups(model, model.backbone, weight_decay=o.weight_decay, layer_decay=o.layer_decay),
                    lr=o.lr, betas=(0.9, o.beta2))  # fmt: skip
        steps = max(1, cfg.train.epochs * len(train_dl))
        warm = min(steps, int(round(o.warmup_epochs * len(train_dl))))
        device, weights = self.device, cfg.train.loss

        def loss_fn(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            out = m.forward_outputs(batch["image"].to(device))
            return localization_loss(out, batch["mask"].to(device), batch["label"].to(device)[:, 0], weights)["total"]

        t = cfg.train
        trainer = Trainer(model, opt, loss_fn, schedule=WarmupCosine(o.lr, steps, warm, o.min_lr),
                          cfg=LoopConfig(t.epochs, t.grad_clip, t.amp, progress=t.progress, max_seconds=t.max_seconds),
                          device=device)  # fmt: skip
        best: dict[str, Any] = {"key": (-1.0, -np.inf)}

        def end_epoch(epoch: int, metrics: dict[str, float]) -> dict[str, float]:
            val = self._validate(model, val_dl)
            if (val["val_f1"], -val["val_loss"]) > best["key"]:
                best.update(key=(val["val_f1"], -val["val_loss"]), epoch=epoch, val=val,
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})  # fmt: skip
            run.log_metrics({**metrics, **{k: v for k, v in val.items() if k != "image_threshold"}}, step=epoch)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val F1 %.3f at %.2f", epoch, metrics["train_loss"],
                     val["val_loss"], val["val_f1"], val["mask_threshold"])  # fmt: skip
            return {"val_f1": val["val_f1"], "val_loss": val["val_loss"]}

        trainer.fit(train_dl, on_epoch_end=end_epoch)
        model.load_state_dict(best["state"])
        v = best["val"]
        return Fitted(model.eval(), best["epoch"], v["val_f1"], v["mask_threshold"], v["image_threshold"],
                      [h["train_loss"] for h in trainer.state.history])  # fmt: skip

    @torch.no_grad()
    def _validate(self, model: nn.Module, loader) -> dict[str, float]:
        """Validation at the input resolution: loss, the mask threshold of `THRESHOLD_GRID` with the best mean F1
        over tampered images (ties: nearest 0.5) and that F1, F1 at 0.5, and the image score's Youden threshold."""
        from loupe.domains.forensics.detect import choose_threshold

        model.eval()
        probs, masks, labels, scores, losses = [], [], [], [], []
        for batch in loader:
            out = model.forward_outputs(batch["image"].to(self.device))
            label = batch["label"].to(self.device)[:, 0]
            parts = localization_loss(out, batch["mask"].to(self.device), label, self.cfg.train.loss)
            losses.append(float(parts["total"]))
            probs.append(out["mask_logits"].sigmoid().cpu()[:, 0])
            masks.append(batch["mask"][:, 0].bool())
            labels.append(batch["label"][:, 0])
            scores.append(out["logits"].sigmoid().cpu()[:, 0])
        p, g, y, s = torch.cat(probs), torch.cat(masks), torch.cat(labels).numpy(), torch.cat(scores).numpy()
        p, g = p[y == 1], g[y == 1]
        f1 = {float(t): _mean_f1(p >= t, g) for t in THRESHOLD_GRID}
        best = max(sorted(f1, key=lambda t: abs(t - 0.5)), key=f1.__getitem__)
        return {
            "val_loss": float(np.mean(losses)),
            "val_f1": f1[best],
            "val_f1_05": _mean_f1(p >= 0.5, g),
            "mask_threshold": best,
            "image_threshold": choose_threshold(y, s),
        }

    # -------------------------------------------------------------------------------------------------- the run
    def train(self) -> dict[str, Any]:
        t0 = time.time()
        with self.tracked_run() as run:
            data_dir = self.out / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            self.frame.to_csv(data_dir / "manifest.csv", index=False)
            run.log_artifact(data_dir / "manifest.csv", "data")
            fitted = self.fit(run)
            run.set_tags({"init": self.cfg.model.init or "random", "weights_load": self.load_report[:250]})
            spec = self.spec.replace(source=None, layout="loupe", thresholds={LABEL: fitted.image_threshold},
                                     mask_threshold=fitted.mask_threshold)  # fmt: skip
            model_dir = save_model(fitted.model, spec, self.out / "model")
            run.log_dict(model_signature(spec), "model/signature.json")
            run.log_model_dir(model_dir)
            sets = {"test": self.frame[self.frame["split"] == "test"], **self.cross}
            result: dict[str, Any] = {
                "run_id": run.run_id,
                "best_epoch": fitted.best_epoch,
                "val_f1": fitted.val_f1,
                "mask_threshold": fitted.mask_threshold,
                "image_threshold": fitted.image_threshold,
                "first_loss": fitted.losses[0],
                "final_loss": fitted.losses[-1],
                "model_dir": str(model_dir),
                "weights_load": self.load_report,
                **{f"n_{s}": int((self.frame["split"] == s).sum()) for s in ("train", "val")},
            }
            for name, rows in sets.items():
                result |= self.evaluate_set(run, fitted, rows.reset_index(drop=True), name)
            if self.cfg.train.register_as:
                result["registered_version"] = self.tracker.register_model(self.cfg.train.register_as, run.run_id,
                                                                           self.cfg.train.register_alias)  # fmt: skip
            result["train_seconds"] = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": result["train_seconds"]})
            run.log_dict({k: v for k, v in result.items() if not isinstance(v, np.ndarray)}, "summary.json")
            return result

    def evaluate_set(self, run, fitted: Fitted, rows: pd.DataFrame, name: str) -> dict[str, Any]:
        """The model and the baselines on one set, masks on each file's frame; metrics ``<name>_*`` and
        ``<name>_baseline_<b>_*``, logged and returned; masks, per-image tables and overlays written and logged."""
        ds = MaskedImages(rows, self.spec)
        probs, scores = self._predict(fitted.model, ds)
        gts, labels = [ds.picture(i)[1] for i in range(len(ds))], rows[LABEL].to_numpy()
        ev, groups = self.cfg.eval, rows["group"].astype(str).to_numpy()
        kw = dict(n_boot=ev.n_boot, alpha=ev.alpha, groups=groups, seed=self.cfg.run.seed)
        metrics, table = localization_metrics(probs, gts, labels, scores, mask_threshold=fitted.mask_threshold,
                                              image_threshold=fitted.image_threshold, **kw)  # fmt: skip
        result = {f"{name}_{k}": v for k, v in metrics.items()}
        where = self.out / "evaluation" / name
        where.mkdir(parents=True, exist_ok=True)
        table.insert(0, "path", rows["path"].to_numpy())
        table.to_csv(where / "per_image.csv", index=False)
        run.log_artifact(where / "per_image.csv", f"evaluation/{name}")
        self._write_masks(run, ds, probs, name)
        if ev.baselines:
            topk = self.cfg.model.topk_fraction
            for b, make in BASELINES.items():
                maps = [make(ds.picture(i)[0]) for i in range(len(ds))]
                bm, _ = localization_metrics(maps, gts, labels, np.array([topk_mean(p, topk) for p in maps]),
                                             mask_threshold=0.5, image_threshold=0.5, **kw)  # fmt: skip
                result |= {f"{name}_baseline_{b}_{k}": v for k, v in bm.items()}
        run.log_metrics({k: v for k, v in result.items() if np.isfinite(v)})
        get = lambda k: result.get(f"{name}_{k}", float("nan"))  # noqa: E731
        log.info("%s: pixel F1@0.5 %.3f (all-tampered %.3f), image AUROC %.3f", name, get("pixel_f1_05"),
                 get("baseline_all_tampered_pixel_f1_05"), get("image_auroc"))  # fmt: skip
        return result

    @torch.no_grad()
    def _predict(self, model: nn.Module, ds: MaskedImages) -> tuple[list[np.ndarray], np.ndarray]:
        """Per image: the tampering probability placed on the file's frame (bilinear, as the scoring engine places
        a unit's mask), ``[H, W]``; and the image scores ``[N]``."""
        model.eval()
        probs, scores = [], []
        for batch in self._loader(ds, train=False):
            out = model.forward_outputs(batch["image"].to(self.device))
            for logit, meta in zip(out["mask_logits"].float().cpu(), batch["meta"], strict=True):
                h, w = ds.picture(meta["index"])[1].shape
                up = F.interpolate(logit[None], size=(h, w), mode="bilinear", align_corners=False)
                probs.append(up[0, 0].sigmoid().numpy())
            scores.append(out["logits"].float().sigmoid().cpu()[:, 0])
        return probs, torch.cat(scores).numpy()

    def _write_masks(self, run, ds: MaskedImages, probs: list[np.ndarray], name: str) -> None:
        from loupe.core.io.maps import save_map

        ev = self.cfg.eval
        folder = self.out / "masks" / name
        order = np.argsort(-ds.rows[LABEL].to_numpy(), kind="stable")  # overlays of tampered images first
        for rank, i in enumerate(order):
            stem = f"{i:04d}_{Path(ds.rows.loc[i, 'path']).stem}"
            if ev.write_masks:
                save_map(probs[i], folder / f"{stem}.png")
            if rank < ev.overlays:
                a, g = ds.picture(i)
                fig = overlay_figure(a, g, probs[i], f"{name}: {Path(ds.rows.loc[i, 'path']).name}")
                (self.out / "overlays" / name).mkdir(parents=True, exist_ok=True)
                fig.savefig(self.out / "overlays" / name / f"{stem}.png", dpi=90)
                run.log_figure(fig, f"overlays/{name}/{stem}.png")
        if ev.write_masks and len(ds):
            run.log_artifact(folder, f"masks/{name}")

    def evaluate(self) -> dict[str, Any]:
        raise ConfigError("forensics.localize trains and evaluates in one run; run it with `loupe train`")


def _mean_f1(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean per-image pixel F1 of boolean ``[N, H, W]`` predictions against ``gt`` (NaN without images)."""
    if not len(gt):
        return float("nan")
    tp = (pred & gt).sum((1, 2)).double()
    fp, fn = (pred & ~gt).sum((1, 2)).double(), (~pred & gt).sum((1, 2)).double()
    den = 2 * tp + fp + fn
    return float(torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.ones_like(den)).mean())
