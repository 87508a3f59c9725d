"""Real-vs-fake image detectors (``forensics.detect``) and in-domain MAE pretraining (``forensics.mae_pretrain``).

``forensics.detect`` trains a ViT detector by one of four ``train.method``s:

- ``linear_probe``: the backbone frozen, a linear head on its pooled embedding (UnivFD, Ojha et al. 2023).
- ``ln_tune``: only the LayerNorm parameters and the head train; the head reads the L2-normalised embedding and a
  hypersphere metric loss (alignment + uniformity, Wang & Isola 2020, or supervised contrastive) is added to the
  cross-entropy (Yermakov et al. 2025, "Unlocking the Hidden Potential of CLIP in Generalizable Deepfake
  Detection").
- ``lora``: low-rank adapters (`peft`) on the attention and MLP linear layers and the head; merged before saving.
- ``finetune``: everything, with layer-wise LR decay: the reference.

Training images go through `TrainAugment` (flips, random crops, downscale-upscale, blur, JPEG re-compression). The
checkpoint with the best validation AUROC (ties: lower validation loss) is kept; its validation Youden threshold
becomes the model's stored threshold. The test split gets AUROC with a bootstrap 95 % CI (by ``group`` when the
manifest has one), AP, accuracy at 0.5 and at the stored threshold, EER, the ROC and reliability plots, and a
pixel-statistics logistic regression in the same run as the baseline. With ``eval.robustness`` the model is swept
over JPEG / blur / downscale / noise (`loupe.domains.forensics.robustness`); with a ``generator`` column, one model
per generator is trained without that generator's fakes and tested on them (leave-one-generator-out).

Data: a manifest by ``data.manifest=...`` (``path, label[, split, group, generator]``), see
`loupe.domains.forensics.data`.
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

from loupe.core.distributed import DistInfo, make_loader, pick_device
from loupe.core.errors import ConfigError
from loupe.core.evaluation import EvalConfig, evaluation_report, log_report, predict
from loupe.core.models.classifier import build_model, save_model
from loupe.core.models.tome import fine_tune_with_merging, token_merging_problems
from loupe.core.optim import OptimConfig, WarmupCosine, adamw, param_groups
from loupe.core.pretrain import MAEModel, MAEPretrainBase
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.registry import MODELS
from loupe.core.tracking import NullRun
from loupe.core.training import LoopConfig, Trainer
from loupe.domains.forensics.data import ForensicsData, NativeCrops, detect_dataset, load_forensics_manifest
from loupe.domains.forensics.models import LABEL, forensics_spec
from loupe.domains.forensics.robustness import (
    AugmentConfig,
    TrainAugment,
    as_rgb8,
    detection_metrics,
    log_sweep,
    robustness_sweep,
)

log = logging.getLogger(__name__)
METHODS = ("linear_probe", "ln_tune", "lora", "finetune")
METRIC_LOSSES = ("align_uniform", "supcon", "none")
#: LoRA targets: the attention and MLP linears of timm blocks (also open_clip's timm trunks) and of open_clip's
#: own ViT (its nn.MultiheadAttention and c_fc / c_proj); never the patch embedding.
LORA_TARGETS = (
    r".*(\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    r"|resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj))"
)


# ------------------------------------------------------------------------------------------- hypersphere losses
def align_uniform_loss(z: torch.Tensor, y: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Alignment (mean squared distance of same-class pairs) + uniformity (log mean Gaussian potential
    ``exp(-t d^2)`` over all pairs) of unit embeddings ``z`` ``[B, D]`` with labels ``y`` ``[B]``."""
    d2 = torch.cdist(z, z).pow(2)  # [B, B]
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    same = (y[:, None] == y[None, :]) & off
    align = d2[same].mean() if same.any() else z.new_zeros(())
    uniform = torch.exp(-t * d2[off]).mean().clamp_min(1e-12).log() if off.any() else z.new_zeros(())
    return align + uniform


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of unit embeddings ``z`` ``[B, D]``, labels ``y`` ``[B]``:
    each anchor's same-class samples against all others; anchors without a positive are skipped."""
    sim = z @ z.t() / temperature  # [B, B]
    off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = (y[:, None] == y[None, :]) & off
    logprob = sim - torch.logsumexp(sim.masked_fill(~off, float("-inf")), dim=1, keepdim=True)
    has = pos.any(1)
    if not has.any():
        return z.new_zeros(())
    return -((logprob * pos).sum(1)[has] / pos.sum(1)[has]).mean()


def choose_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The operating threshold from validation labels ``y`` and fake scores ``s``: Youden's J (ties: the highest
    threshold), a score from ``s`` clipped to [0, 1]; 0.5 when validation holds one class only."""
    from loupe.core.metrics import youden_threshold

    t = youden_threshold(y, s)
    return float(np.clip(t, 0.0, 1.0)) if np.isfinite(t) else 0.5


# -------------------------------------------------------------------------------------------------- the methods
def freeze_for(model: nn.Module, method: str) -> list[str]:
    """Set ``requires_grad`` for ``linear_probe`` (head), ``ln_tune`` (every LayerNorm of the backbone + head) or
    ``finetune`` (all); ``lora`` freezes all but the head here, `add_lora` adds the adapters. The trainable names."""
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {list(METHODS)}, got {method!r}")
    model.requires_grad_(method == "finetune")
    if method == "ln_tune":
        norms = [m for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise ConfigError("ln_tune needs LayerNorm layers in the backbone; this one has none")
        for m in norms:
            m.requires_grad_(True)
    model.head.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: str = "") -> nn.Module:
    """``model`` wrapped by `peft` with LoRA adapters on the modules whose names match ``targets`` (a regex,
    default `LORA_TARGETS`); the adapters and the head train. B starts at zero: the outputs are unchanged."""
    from peft import LoraConfig, get_peft_model

    pattern = targets or LORA_TARGETS
    try:
        wrapped = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=pattern))  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {pattern!r} match no layer of this backbone ({exc}); pass "
                          "train.lora_targets as a regex over module names") from None  # fmt: skip
    model.head.requires_grad_(True)  # the head is the base model's own module: it stays in the merged model
    return wrapped


def merge_lora(wrapped: nn.Module) -> nn.Module:
    """The adapters multiplied into the weights: the plain model, with the same outputs."""
    model = wrapped.merge_and_unload()
    model.requires_grad_(True)
    return model.eval()


# --------------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class DetectModel:
    """``init``: '' (random), a weight source (``file:``/``local-dir:``/``tag:``/``hf-hub:``) or an MLflow URI of an
    MAE checkpoint or model; ``init_layout``: mae / timm / loupe / open_clip / hf-clip; ``resize_mode``:
    center_crop (no resampling: the default for detectors), shorter_side_crop or squash."""

    name: str = "forensics_vit_micro_patch8"
    img_size: int = 64
    resize_mode: str = "center_crop"
    drop_path: float = 0.0
    init: str = ""
    init_layout: str = "mae"
    token_merging: str = ""  # e.g. tome8: fine-tune with token merging (`loupe.core.models.tome`); '' = every token

    def problems(self) -> list[str]:
        out = [] if self.name in MODELS else [f"name: model {self.name!r} is not registered (`loupe models`)"]
        out += token_merging_problems(self.token_merging)
        if self.init_layout not in ("mae", "timm", "loupe", "open_clip", "hf-clip"):
            out.append(f"init_layout: expected mae, timm, loupe, open_clip or hf-clip, got {self.init_layout!r}")
        if self.resize_mode not in ("center_crop", "shorter_side_crop", "squash"):
            out.append(f"resize_mode: expected center_crop, shorter_side_crop or squash, got {self.resize_mode!r}")
        if self.img_size < 8 or not 0.0 <= self.drop_path < 1.0:
            out.append(f"img_size must be >= 8 and drop_path in [0, 1), got {self.img_size}, {self.drop_path}")
        return out


@dataclass(frozen=True)
class DetectTrain:
    """``metric_loss`` / ``metric_weight``: the hypersphere loss added to the cross-entropy (ln_tune; 0 = none);
    ``lora_targets``: a regex over module names ('' = attention and MLP linears)."""

    method: str = "linear_probe"
    epochs: int = 20
    metric_loss: str = "align_uniform"
    metric_weight: float = 0.1
    temperature: float = 0.1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    label_smoothing: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: str = "auto"
    threads: int = 0
    progress: bool = True
    register_as: str = ""
    register_alias: str = "candidate"

    def problems(self) -> list[str]:
        out = [] if self.method in METHODS else [f"method: expected one of {list(METHODS)}, got {self.method!r}"]
        if self.metric_loss not in METRIC_LOSSES:
            out.append(f"metric_loss: expected one of {list(METRIC_LOSSES)}, got {self.metric_loss!r}")
        if self.metric_weight < 0 or self.temperature <= 0 or self.lora_rank < 1 or self.lora_alpha <= 0:
            out.append("metric_weight must be >= 0, temperature and lora_alpha > 0, lora_rank >= 1")
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return out + LoopConfig(self.epochs, 0.0, self.amp).problems()


@dataclass(frozen=True)
class DetectEval(EvalConfig):
    """``robustness``: the degradation sweep on the test split; ``leave_one_generator_out``: one model per
    generator when the manifest has a generator column; ``baseline``: the pixel-statistics logistic regression."""

    robustness: bool = False
    leave_one_generator_out: bool = True
    baseline: bool = True


@dataclass(frozen=True)
class DetectConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="forensics-detect"))
    data: ForensicsData = field(default_factory=ForensicsData)
    model: DetectModel = field(default_factory=DetectModel)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.75,
                                                                   warmup_epochs=1))  # fmt: skip
    train: DetectTrain = field(default_factory=DetectTrain)
    eval: DetectEval = field(default_factory=DetectEval)


# --------------------------------------------------------------------------------------------------- the recipe
@dataclass
class Fitted:
    """One trained detector: the plain (merged) model, its validation AUROC / loss / Youden threshold, the epoch
    kept, the trainable parameter names and count, and the loss of each epoch."""

    model: nn.Module
    val_auroc: float
    val_loss: float
    threshold: float
    best_epoch: int
    trainable: list[str]
    n_trainable: int
    losses: list[float]


@register_recipe("forensics.detect", domain="forensics")
class DetectRecipe(Recipe):
    """Real-vs-fake detector (linear probe / LN-tuning / LoRA / fine-tuning) with robustness and per-generator tests."""

    config_cls = DetectConfig
    default_name = "forensics_detect"

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.run.device)
        self.run: Any = NullRun()  # the tracked run while training (fit() logs to it)
        self.out = self.output_dir(cfg.run.name or self.default_name)
        self.frame = load_forensics_manifest(cfg.data, cfg.run.seed)
        self.root = cfg.data.root
        m = cfg.model
        self.source = resolve_init(m.init, self.tracker, self.out / "init")
        kwargs: dict[str, Any] = {"drop_path_rate": m.drop_path} if m.drop_path else {}
        if cfg.train.method == "ln_tune":
            kwargs["normalize_features"] = True
        self.spec = forensics_spec(cfg.run.name or self.default_name, m.name, img_size=m.img_size,
                                   resize_mode=m.resize_mode, source=self.source,
                                   layout=m.init_layout if self.source else "loupe", model_kwargs=kwargs)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- one model
    def _loader(self, rows: pd.DataFrame, train: bool):
        augment = TrainAugment(self.cfg.train.augment, self.cfg.model.img_size) if train else None
        ds = detect_dataset(rows, self.root, self.spec, augment)
        d = self.cfg.data
        return make_loader(ds, DistInfo(), batch_size=d.batch_size, num_workers=d.num_workers, train=train,
                           seed=self.cfg.run.seed)  # fmt: skip

    def _optimizer(self, model: nn.Module, backbone) -> torch.optim.Optimizer:
        o = self.cfg.optim
        if self.cfg.train.method == "finetune":
            groups = param_groups(model, backbone, weight_decay=o.weight_decay, layer_decay=o.layer_decay)
            return adamw(groups, lr=o.lr, betas=(0.9, o.beta2))
        params = [p for p in model.parameters() if p.requires_grad]
        return adamw([{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=o.lr,
                     betas=(0.9, o.beta2))  # fmt: skip

    def _loss_fn(self):
        from loupe.core.models.heads import model_outputs

        t, device = self.cfg.train, self.device
        metric = {"align_uniform": align_uniform_loss, "supcon": lambda z, y: supcon_loss(z, y, t.temperature)}
        use_metric = t.metric_weight > 0 and t.metric_loss != "none" and t.method == "ln_tune"

        def loss_fn(model, batch):
            x, y = batch["image"].to(device), batch["label"].to(device)[:, 0]
            out = model_outputs(model, x)
            target = y * (1 - t.label_smoothing) + 0.5 * t.label_smoothing
            loss = F.binary_cross_entropy_with_logits(out["logits"][:, 0].float(), target)
            if use_metric:
                loss = loss + t.metric_weight * metric[t.metric_loss](F.normalize(out["embedding"].float(), dim=-1), y)
            return loss

        return loss_fn

    def fit(self, frame: pd.DataFrame, tag: str = "") -> Fitted:
        """Build, train and select one detector on ``frame``'s train / val rows; ``tag`` prefixes its logging."""
        t = self.cfg.train
        model, report = build_model(self.spec)
        self.load_report = report.summary() if report else "random init"
        self.spec = fine_tune_with_merging(model, self.spec, self.cfg.model.token_merging)
        trainable = freeze_for(model, t.method)
        backbone = model.backbone
        if t.method == "lora":
            model = add_lora(model, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                             targets=t.lora_targets)  # fmt: skip
            trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        model = model.to(self.device)
        train_dl = self._loader(frame[frame["split"] == "train"], train=True)
        val_dl = self._loader(frame[frame["split"] == "val"], train=False)
        opt = self._optimizer(model, backbone)
        steps = max(1, t.epochs * len(train_dl))
        warm = min(steps, int(round(self.cfg.optim.warmup_epochs * len(train_dl))))
        trainer = Trainer(model, opt, self._loss_fn(), schedule=WarmupCosine(self.cfg.optim.lr, steps, warm,
                          self.cfg.optim.min_lr), cfg=LoopConfig(t.epochs, 0.0, t.amp, progress=t.progress),
                          device=self.device)  # fmt: skip
        best: dict[str, Any] = {"key": (-1.0, -np.inf)}

        def end_epoch(epoch: int, metrics: dict[str, float]) -> dict[str, float]:
            from loupe.core.metrics import auroc

            S, Y, _ = predict(model, val_dl, self.device, task="binary")
            s, y = S[:, 0], Y[:, 0]
            val, loss = auroc(y, s), float(-np.mean(np.log(np.clip(np.where(y == 1, s, 1 - s), 1e-7, 1.0))))
            if (val, -loss) > best["key"]:  # ties on a small validation split: the better-calibrated epoch
                keep = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                best.update(key=(val, -loss), epoch=epoch, state=keep, y=y, s=s)
            self.run.log_metrics({f"{tag}{k}": v for k, v in {**metrics, "val_auroc": val, "val_loss": loss}.items()},
                                 step=epoch)  # fmt: skip
            log.info("%sepoch %d: train loss %.4f, val AUROC %.4f, val loss %.4f", tag, epoch, metrics["train_loss"],
                     val, loss)  # fmt: skip
            return {"val_auroc": val, "val_loss": loss}

        trainer.fit(train_dl, on_epoch_end=end_epoch)
        model.load_state_dict(best["state"], strict=False)
        if t.method == "lora":
            model = merge_lora(model)
        threshold = choose_threshold(best["y"], best["s"])
        n = sum(v.numel() for v in best["state"].values())  # the kept state is exactly the trainable parameters
        return Fitted(model.eval(), best["key"][0], -best["key"][1], threshold, best["epoch"], trainable, n,
                      [h["train_loss"] for h in trainer.state.history])  # fmt: skip

    def score(self, model: nn.Module, rows: pd.DataFrame) -> np.ndarray:
        S, _, _ = predict(model, self._loader(rows, train=False), self.device, task="binary")
        return S[:, 0]

    # -------------------------------------------------------------------------------------------------- the run
    def train(self) -> dict[str, Any]:
        t0 = time.time()
        with self.tracked_run() as run:
            self.run = run
            self.frame.to_csv(self.out / "manifest.csv", index=False)
            run.log_artifact(self.out / "manifest.csv", "data")
            fitted = self.fit(self.frame)
            run.set_tags({"init": self.cfg.model.init or "random", "weights_load": self.load_report[:250],
                          "method": self.cfg.train.method})  # fmt: skip
            result = self._evaluate(run, fitted)
            result |= self._extras(run, fitted)
            result["train_seconds"] = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": result["train_seconds"]})
            return result

    def _evaluate(self, run, fitted: Fitted) -> dict[str, Any]:
        test = self.frame[self.frame["split"] == "test"].reset_index(drop=True)
        s, y = self.score(fitted.model, test), test[LABEL].to_numpy()
        groups = test["group"].to_numpy() if "group" in test.columns else None
        ev = self.cfg.eval
        m = detection_metrics(y, s, fitted.threshold, n_boot=ev.n_boot, alpha=ev.alpha, groups=groups)
        report = evaluation_report(y[:, None], s[:, None], (LABEL,), cfg=ev, thresholds={LABEL: fitted.threshold},
                                   groups=groups)  # fmt: skip
        report.metrics |= {f"test_{k}": v for k, v in m.items() if k not in ("n", "n_fake")}
        report.metrics |= {"val_auroc": fitted.val_auroc, "val_threshold": fitted.threshold,
                           "trainable_params": float(fitted.n_trainable)}  # fmt: skip
        log_report(run, report, self.out / "evaluation")
        preds = test[["path", LABEL]].assign(score=s, decision=s >= fitted.threshold)
        preds.to_csv(self.out / "evaluation" / "test_predictions.csv", index=False)
        run.log_artifact(self.out / "evaluation" / "test_predictions.csv", "evaluation")
        spec = self.spec.replace(source=None, layout="loupe", thresholds={LABEL: fitted.threshold})
        model_dir = save_model(fitted.model, spec, self.out / "model")
        run.log_dict(model_signature(spec), "model/signature.json")
        run.log_model_dir(model_dir)
        version = None
        if self.cfg.train.register_as:
            version = self.tracker.register_model(self.cfg.train.register_as, run.run_id, self.cfg.train.register_alias)
        return {"run_id": run.run_id, "method": self.cfg.train.method, "best_epoch": fitted.best_epoch,
                "val_auroc": fitted.val_auroc, "threshold": fitted.threshold, "test_auroc": m["auroc"],
                "test_auroc_ci": [m["ci_low"], m["ci_high"]], "test_ap": m["ap"], "test_accuracy_05": m["accuracy_05"],
                "test_accuracy": m["accuracy"], "test_eer": m["eer"], "n_test": len(test),
                "trainable_params": fitted.n_trainable, "first_loss": fitted.losses[0],
                "final_loss": fitted.losses[-1], "model_dir": str(model_dir), "registered_version": version,
                "weights_load": self.load_report}  # fmt: skip

    def _extras(self, run, fitted: Fitted) -> dict[str, Any]:
        ev, out = self.cfg.eval, {}
        test = self.frame[self.frame["split"] == "test"].reset_index(drop=True)
        groups = test["group"].to_numpy() if "group" in test.columns else None
        if ev.baseline:
            out |= pixel_baseline(self.frame, self.root, self.spec, ev)
            run.log_metrics(out)
        if ev.robustness:
            spec = self.spec.replace(source=None, layout="loupe")
            table = robustness_sweep(fitted.model, spec, test, self.root, self.device, threshold=fitted.threshold,
                                     n_boot=ev.n_boot, groups=groups, batch_size=self.cfg.data.batch_size,
                                     seed=self.cfg.run.seed)  # fmt: skip
            log_sweep(run, table, self.out / "robustness", title=f"{self.cfg.train.method}: test AUROC")
            out["robustness"] = table.to_dict("records")
        if ev.leave_one_generator_out and "generator" in self.frame.columns:
            table = self.leave_one_generator_out()
            if len(table):
                (self.out / "evaluation").mkdir(parents=True, exist_ok=True)
                table.to_csv(self.out / "evaluation" / "leave_one_generator_out.csv", index=False)
                run.log_artifact(self.out / "evaluation" / "leave_one_generator_out.csv", "evaluation")
                run.log_metrics({f"logo_{r.generator}_auroc": float(r.auroc) for r in table.itertuples()})
                out["leave_one_generator_out"] = table.to_dict("records")
        return out

    def leave_one_generator_out(self) -> pd.DataFrame:
        """One row per generator G: a detector trained without G's fakes (train and val), tested on the test
        split's real images and G's fakes."""
        f = self.frame
        fakes = f[f[LABEL] == 1]
        gens = sorted(str(g) for g in fakes["generator"].dropna().unique() if str(g).strip())
        if len(gens) < 2:
            log.warning("leave-one-generator-out needs >= 2 generators among the fakes, found %s; skipped", gens)
            return pd.DataFrame()
        rows = []
        for g in gens:
            is_g = (f[LABEL] == 1) & (f["generator"].astype(str) == g)
            fitted = self.fit(f[~is_g | (f["split"] == "test")], tag=f"logo_{g}_")
            test = f[(f["split"] == "test") & ((f[LABEL] == 0) | is_g)].reset_index(drop=True)
            s = self.score(fitted.model, test)
            groups = test["group"].to_numpy() if "group" in test.columns else None
            m = detection_metrics(test[LABEL].to_numpy(), s, fitted.threshold, n_boot=self.cfg.eval.n_boot,
                                  groups=groups)  # fmt: skip
            rows.append({"generator": g, **m})
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- the baseline
def pixel_features(x: torch.Tensor) -> np.ndarray:
    """Per image of ``x`` ``[N, 3, H, W]`` (0..1): channel mean, std, an 8-bin histogram per channel and the mean
    absolute Laplacian per channel (high-frequency energy)  # [N, 33]."""
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    hf = F.conv2d(x, lap, groups=3).abs().mean((2, 3))  # [N, 3]
    flat = x.flatten(2)  # [N, 3, HW]
    hist = torch.stack([torch.stack([torch.histc(c, bins=8, min=0, max=1) / c.numel() for c in img]) for img in flat])
    return torch.cat([flat.mean(2), flat.std(2), hist.flatten(1), hf], 1).numpy()


def pixel_baseline(frame: pd.DataFrame, root: Path, spec, cfg: EvalConfig) -> dict[str, float]:
    """Test AUROC (with CI), AP and accuracy of a logistic regression on `pixel_features` of the very pixels the
    model sees (its centre crops), trained on the train split: what colour and sharpness alone give."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from loupe.core.io import read_any
    from loupe.core.transforms import resize, to_unit_float

    def feats(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = frame[frame["split"] == split]
        x = torch.stack([resize(to_unit_float(as_rgb8(read_any(root / p).array)), tuple(spec.input_size[1:]),
                                spec.resize_mode, spec.interpolation).clamp(0, 1) for p in rows["path"]])  # fmt: skip
        return pixel_features(x), rows[LABEL].to_numpy()

    (xtr, ytr), (xte, yte) = feats("train"), feats("test")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(xtr, ytr)
    s = clf.predict_proba(xte)[:, 1]
    m = detection_metrics(yte, s, 0.5, n_boot=cfg.n_boot, alpha=cfg.alpha)
    return {f"baseline_pixel_{k}": m[k] for k in ("auroc", "ci_low", "ci_high", "ap", "accuracy_05", "eer")}


# ------------------------------------------------------------------------------------------------------------ MAE
@dataclass(frozen=True)
class MAELoop:
    epochs: int = 50
    crops_per_image: int = 2
    threads: int = 0
    progress: bool = True


@dataclass(frozen=True)
class MAEPretrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="forensics-mae"))
    data: ForensicsData = field(default_factory=ForensicsData)
    model: MAEModel = field(default_factory=lambda: MAEModel(name="forensics_mae_vit_micro_patch8"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.5e-3, warmup_epochs=5, beta2=0.95))
    train: MAELoop = field(default_factory=MAELoop)


@register_recipe("forensics.mae_pretrain", domain="forensics")
class MAEPretrainRecipe(MAEPretrainBase):
    """Masked-autoencoder pretraining of a detector ViT on the train and validation images (labels unused)."""

    config_cls = MAEPretrainConfig
    default_name = "forensics_mae"

    def _images(self) -> list[Path]:
        frame = load_forensics_manifest(self.cfg.data, self.cfg.run.seed)  # the detector's split: test never seen
        return [self.cfg.data.root / p for p in frame.loc[frame["split"] != "test", "path"]]

    def _spec(self, architecture: str):
        return forensics_spec(self.cfg.run.name or self.default_name, architecture, img_size=self.cfg.model.img_size,
                              task="embedding", label_names=(), layout="mae")  # fmt: skip

    def _dataset(self, paths: list[Path]):
        return NativeCrops(paths, self.cfg.model.img_size, self.cfg.train.crops_per_image, self.spec)
