"""Patch recipes: MAE pretraining on unlabelled H&E patches (``pathology.mae_pretrain``), patch classification by
fine-tuning (``pathology.patch_finetune``) or a linear probe on the frozen backbone (``pathology.linear_probe``).

Every recipe takes its data from a manifest (``data.manifest=...``, see `loupe.domains.pathology.data`), keeps the
checkpoint with the best validation macro AUROC, scores the test split once, and reports per-class AUROC with
bootstrap 95 % CIs (by ``group`` when the manifest has one), accuracy, and a **baseline in the same run**: a
logistic regression on colour statistics of the same patches (what stain colour alone gives). The model is saved as
a scorable Loupe model folder (tile classifier with top-k slide pooling) and logged to MLflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loupe.core.distributed import DistInfo, make_loader, pick_device
from loupe.core.errors import ConfigError
from loupe.core.evaluation import EvalConfig, evaluation_report, log_report, predict
from loupe.core.models.classifier import build_model, save_model
from loupe.core.models.tome import fine_tune_with_merging, token_merging_problems
from loupe.core.optim import OptimConfig, WarmupCosine, adamw, param_groups
from loupe.core.pretrain import MAEModel, MAEPretrainBase
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.registry import MODELS
from loupe.core.training import LoopConfig, Trainer
from loupe.domains.pathology.data import HEAugment, PatchData, load_patch_manifest, patch_dataset
from loupe.domains.pathology.models import pathology_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchModel:
    """``init``: '' (random), a weight source (``file:``/``local-dir:``/``tag:``) or an MLflow URI of an MAE
    checkpoint or model; ``init_layout``: mae / timm / loupe / open_clip."""

    name: str = "path_vit_micro_patch8"
    img_size: int = 64
    tile_mpp: float = 0.5
    drop_path: float = 0.1
    init: str = ""
    init_layout: str = "mae"
    token_merging: str = ""  # e.g. tome8: fine-tune with token merging (`loupe.core.models.tome`); '' = every token

    def problems(self) -> list[str]:
        out = [] if self.name in MODELS else [f"name: model {self.name!r} is not registered (`loupe models`)"]
        out += token_merging_problems(self.token_merging)
        if self.init_layout not in ("mae", "timm", "loupe", "open_clip"):
            out.append(f"init_layout: expected mae, timm, loupe or open_clip, got {self.init_layout!r}")
        return out


@dataclass(frozen=True)
class PatchTrain:
    epochs: int = 30
    freeze_backbone: bool = False
    augment: bool = True
    label_smoothing: float = 0.0
    amp: str = "auto"
    threads: int = 0
    progress: bool = True
    register_as: str = ""
    register_alias: str = "candidate"

    def problems(self) -> list[str]:
        return LoopConfig(self.epochs, 0.0, self.amp).problems()


@dataclass(frozen=True)
class PatchConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="pathology-patches"))
    data: PatchData = field(default_factory=PatchData)
    model: PatchModel = field(default_factory=PatchModel)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, layer_decay=0.75, warmup_epochs=2))
    train: PatchTrain = field(default_factory=PatchTrain)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n_boot=1000))


@register_recipe("pathology.patch_finetune", domain="pathology")
class PatchFinetuneRecipe(Recipe):
    """Patch classification: fine-tune a ViT (random init or an MAE / pretrained checkpoint) on a manifest."""

    config_cls = PatchConfig
    default_name = "pathology_patch_finetune"

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.run.device)
        self.out = self.output_dir(cfg.run.name or self.default_name)
        self.frame, self.classes = load_patch_manifest(cfg.data, cfg.run.seed)
        self._best_key = (-1.0, -float("inf"))  # (validation AUROC, -validation loss) of the kept epoch
        source = resolve_init(cfg.model.init, self.tracker, self.out / "init")
        m = cfg.model
        self.spec = pathology_spec(cfg.run.name or self.default_name, m.name, self.classes, tile_px=m.img_size,
                                   tile_mpp=m.tile_mpp, source=source, layout=m.init_layout if source else "loupe",
                                   model_kwargs={"drop_path_rate": m.drop_path} if m.drop_path else {})  # fmt: skip
        model, report = build_model(self.spec)
        self.load_report = report.summary() if report else "random init"
        self.spec = fine_tune_with_merging(model, self.spec, m.token_merging)
        if cfg.train.freeze_backbone:
            model.backbone.requires_grad_(False)
        self.model = model.to(self.device)
        self.train_ds = patch_dataset(self.frame, self.classes, cfg.data, self.spec, "train")
        self.val_ds = patch_dataset(self.frame, self.classes, cfg.data, self.spec, "val")
        self.train_dl = self._loader(self.train_ds, train=True)
        self.val_dl = self._loader(self.val_ds, train=False)
        self._setup_trainer()

    def _loader(self, ds, train: bool):
        d = self.cfg.data
        return make_loader(ds, DistInfo(), batch_size=d.batch_size, num_workers=d.num_workers, train=train,
                           seed=self.cfg.run.seed)  # fmt: skip

    def _setup_trainer(self) -> None:
        cfg, device = self.cfg, self.device
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.train.freeze_backbone:
            opt = adamw([{"params": params, "weight_decay": cfg.optim.weight_decay}], lr=cfg.optim.lr)
        else:
            groups = param_groups(self.model, self.model.backbone, weight_decay=cfg.optim.weight_decay,
                                  layer_decay=cfg.optim.layer_decay)  # fmt: skip
            opt = adamw(groups, lr=cfg.optim.lr, betas=(0.9, cfg.optim.beta2))
        steps = max(1, cfg.train.epochs * len(self.train_dl))
        warm = min(steps, int(round(cfg.optim.warmup_epochs * len(self.train_dl))))
        augment = HEAugment(self.spec.mean, self.spec.std) if cfg.train.augment else (lambda x: x)
        smoothing = cfg.train.label_smoothing

        def loss_fn(model, batch):
            x = augment(batch["image"].to(device))
            target = batch["label"].to(device).argmax(-1)
            return F.cross_entropy(model(x), target, label_smoothing=smoothing)

        t = cfg.train
        self.trainer = Trainer(self.model, opt, loss_fn, schedule=WarmupCosine(cfg.optim.lr, steps, warm,
                               cfg.optim.min_lr), cfg=LoopConfig(t.epochs, 0.0, t.amp, progress=t.progress),
                               device=device, checkpoint_dir=self.out / "checkpoints")  # fmt: skip

    def train(self) -> dict[str, Any]:
        t0 = time.time()
        with self.tracked_run() as run:
            run.set_tags({"init": self.cfg.model.init or "random", "weights_load": self.load_report[:250]})
            self.trainer.fit(self.train_dl, on_epoch_end=lambda e, m: self._end_epoch(run, e, m))
            result = self._finish(run)
            result["train_seconds"] = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": result["train_seconds"]})
            return result

    def _end_epoch(self, run, epoch: int, metrics: dict[str, float]) -> dict[str, float]:
        from loupe.core.metrics import macro_auroc

        S, Y, _ = predict(self.model, self.val_dl, self.device, task="multiclass")
        val = float(macro_auroc(Y, S))
        val_loss = float(-np.log(np.clip((S * Y).sum(1), 1e-7, 1.0)).mean())  # cross-entropy of the true class
        state = self.trainer.state
        # best AUROC, ties broken by the lower validation loss: a small validation split that is separated
        # perfectly from the first epoch on would otherwise keep the first epoch's barely trained weights
        key = (val, -val_loss)
        if state.best is None or key > self._best_key:
            state.best, state.best_epoch, self._best_key = val, epoch, key
            save_model(self.model, self.spec, self.out / "best")
        run.log_metrics({**metrics, "val_macro_auroc": val, "val_loss": val_loss}, step=epoch)
        log.info("epoch %d: train loss %.4f, val macro AUROC %.4f, val loss %.4f", epoch, metrics["train_loss"], val,
                 val_loss)  # fmt: skip
        return {"val_macro_auroc": val, "val_loss": val_loss}

    def _finish(self, run) -> dict[str, Any]:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(self.out / "best" / "weights.safetensors")))
        spec = self.spec.replace(source=None, layout="loupe")
        test_ds = patch_dataset(self.frame, self.classes, self.cfg.data, spec, "test")
        S, Y, _ = predict(self.model, self._loader(test_ds, train=False), self.device, task="multiclass")
        groups = test_ds.frame["group"].to_numpy() if "group" in test_ds.frame.columns else None
        report = evaluation_report(Y, S, self.classes, cfg=self.cfg.eval, groups=groups)
        accuracy = float((S.argmax(1) == Y.argmax(1)).mean())
        from loupe.core.metrics import paired_macro_auroc_difference

        baseline, colour = colour_baseline(self.frame, self.classes, self.cfg.data, self.cfg.eval)
        if colour is not None:  # the model minus the colour baseline on the same test patches, paired bootstrap
            d = paired_macro_auroc_difference(Y, S, colour, n_boot=self.cfg.eval.n_boot, groups=groups)
            baseline |= {"delta_vs_colour_macro_auroc": d.estimate, "delta_vs_colour_ci_low": d.low,
                         "delta_vs_colour_ci_high": d.high}  # fmt: skip
        report.metrics |= {"test_accuracy": accuracy, **baseline}
        log_report(run, report, self.out / "evaluation")
        model_dir = save_model(self.model, spec, self.out / "model")
        run.log_dict(model_signature(spec), "model/signature.json")
        run.log_model_dir(model_dir)
        version = None
        if self.cfg.train.register_as:
            version = self.tracker.register_model(self.cfg.train.register_as, run.run_id, self.cfg.train.register_alias)
        m = report.metrics
        return {"run_id": run.run_id, "best_epoch": self.trainer.state.best_epoch, "val_macro_auroc":
                self.trainer.state.best, "test_macro_auroc": m["test_macro_auroc"], "test_macro_auroc_ci":
                [m["test_macro_auroc_ci_low"], m["test_macro_auroc_ci_high"]], "test_accuracy": accuracy,
                **baseline, "n_test": len(test_ds), "model_dir": str(model_dir), "registered_version": version,
                "weights_load": self.load_report}  # fmt: skip


@dataclass(frozen=True)
class ProbeConfig(PatchConfig):
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, layer_decay=1.0, weight_decay=1e-4,
                                                                   warmup_epochs=0))  # fmt: skip
    train: PatchTrain = field(default_factory=lambda: PatchTrain(freeze_backbone=True, augment=False))

    def problems(self) -> list[str]:
        return [] if self.train.freeze_backbone else ["train.freeze_backbone must be true for a linear probe"]


@register_recipe("pathology.linear_probe", domain="pathology")
class LinearProbeRecipe(PatchFinetuneRecipe):
    """Linear probe: the backbone frozen (random, MAE or pretrained features), only the head trained."""

    config_cls = ProbeConfig
    default_name = "pathology_linear_probe"


def colour_features(images: list[np.ndarray]) -> np.ndarray:
    """Per-channel mean, std and an 8-bin histogram of each RGB patch: what stain colour alone says  # [N, 30]."""
    out = []
    for a in images:
        a = a.reshape(-1, 3).astype(np.float32) / 255.0
        hist = [np.histogram(a[:, c], bins=8, range=(0, 1))[0] / len(a) for c in range(3)]
        out.append(np.concatenate([a.mean(0), a.std(0), *hist]))
    return np.stack(out)


def colour_baseline(
    frame, classes: tuple[str, ...], data: PatchData, cfg: EvalConfig
) -> tuple[dict[str, float], np.ndarray | None]:
    """Test macro AUROC (with CI) of a logistic regression on `colour_features`, trained on the train split, and
    its test probabilities ``[N_test, K]`` in the manifest's order (None when train has one class)."""
    from sklearn.linear_model import LogisticRegression

    from loupe.core.io import read_any
    from loupe.core.metrics import per_label_auroc_ci

    def feats(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = frame[frame["split"] == split]
        imgs = [np.asarray(read_any(Path(data.root) / p).array)[..., :3] for p in rows["path"]]
        return colour_features(imgs), rows[list(classes)].to_numpy().argmax(1)

    (xtr, ytr), (xte, yte) = feats("train"), feats("test")
    if len(set(ytr)) < 2:
        return {}, None
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    proba = np.zeros((len(xte), len(classes)))
    proba[:, clf.classes_] = clf.predict_proba(xte)
    Y = np.eye(len(classes))[yte]
    table = per_label_auroc_ci(Y, proba, classes, n_boot=cfg.n_boot, seed=0).set_index("label").loc["macro"]
    return {"baseline_colour_macro_auroc": float(table["auroc"]), "baseline_colour_ci_low": float(table["ci_low"]),
            "baseline_colour_ci_high": float(table["ci_high"]),
            "baseline_colour_accuracy": float((proba.argmax(1) == yte).mean())}, proba  # fmt: skip


# ---------------------------------------------------------------------------------------------------- MAE
@dataclass(frozen=True)
class MAEData:
    """Unlabelled patches: the image column of each manifest (labels ignored, test rows left out)."""

    manifests: tuple[str, ...] = ("../shared/data/pathology/tcga_luadlusc/labels.csv",)
    path_columns: tuple[str, ...] = ("path", "tile")  # the first of these a manifest has names its images
    crops_per_image: int = 4
    batch_size: int = 64


@dataclass(frozen=True)
class MAELoop:
    epochs: int = 100
    threads: int = 0
    progress: bool = True


@dataclass(frozen=True)
class MAEConfig_:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="pathology-mae"))
    data: MAEData = field(default_factory=MAEData)
    model: MAEModel = field(default_factory=lambda: MAEModel(name="path_mae_vit_micro_patch8"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-3, warmup_epochs=5, beta2=0.95))
    train: MAELoop = field(default_factory=MAELoop)


class CropDataset(torch.utils.data.Dataset):
    """``crops_per_image`` random crops of ``size`` from each image (re-drawn every epoch), RGB normalised."""

    def __init__(self, paths: list[Path], size: int, crops: int, spec):
        from loupe.core.transforms import ModelInput

        self.paths, self.size, self.crops, self.prep = paths, size, crops, ModelInput(spec)
        self._decoded: dict[int, np.ndarray] = {}  # a few hundred patches: decode each once

    def __len__(self) -> int:
        return len(self.paths) * self.crops

    def __getitem__(self, i: int) -> dict[str, Any]:
        from loupe.core.io import read_any

        k = i // self.crops
        if k not in self._decoded:
            self._decoded[k] = np.asarray(read_any(self.paths[k]).array)[..., :3]
        a = self._decoded[k]
        side = min(a.shape[0], a.shape[1], max(self.size, int(min(a.shape[:2]) * np.random.uniform(0.25, 1.0))))
        y, x = np.random.randint(0, a.shape[0] - side + 1), np.random.randint(0, a.shape[1] - side + 1)
        return {"image": self.prep(a[y : y + side, x : x + side]), "label": torch.zeros(0), "meta": {"index": i}}


@register_recipe("pathology.mae_pretrain", domain="pathology")
class MAEPretrainRecipe(MAEPretrainBase):
    """Masked-autoencoder pretraining of a tile ViT on unlabelled H&E patches (self-supervised, in domain)."""

    config_cls = MAEConfig_
    default_name = "pathology_mae"

    def _images(self) -> list[Path]:
        from loupe.core.data import read_manifest

        paths = []
        for m in self.cfg.data.manifests:
            frame = read_manifest(Path(m))
            frame = frame[frame["split"] != "test"] if "split" in frame.columns else frame
            column = next((c for c in self.cfg.data.path_columns if c in frame.columns), None)
            if column is None:
                raise ConfigError(f"manifest {m} has none of the columns {list(self.cfg.data.path_columns)}")
            paths += [Path(m).parent / p for p in frame[column]]
        return paths

    def _spec(self, architecture: str):
        return pathology_spec(self.cfg.run.name or self.default_name, architecture, (),
                              tile_px=self.cfg.model.img_size, task="embedding", layout="mae")  # fmt: skip

    def _dataset(self, paths: list[Path]):
        return CropDataset(paths, self.cfg.model.img_size, self.cfg.data.crops_per_image, self.spec)

    def _make_augment(self):
        return HEAugment(self.spec.mean, self.spec.std, stain=0.0, light=0.0)  # flips and right-angle rotations
