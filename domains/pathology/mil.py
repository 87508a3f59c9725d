"""Slide-level attention MIL (``pathology.mil``): every slide (or large image) of a manifest a bag of tiles, tile
features from a frozen backbone (cached, `loupe.domains.pathology.features`), a gated-attention (ABMIL) or small
transformer aggregator trained on the bags, evaluated with per-class AUROC (bootstrap CIs by group) and accuracy
against **two baselines in the same run**: the majority class, and a logistic regression on mean-pooled features
(MIL without attention). Attention heatmaps of test slides are logged; the model (backbone + MIL head) is saved as a
scorable model folder (`loupe score pathology` gives the slide score and each tile's attention).

MONAI's ``MILModel`` was not used: it takes image bags through its own CNN backbone, while Loupe's bags are
features of any Backbone computed once and cached; the two heads here are ~40 lines in `loupe.core.models.heads`.
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

from loupe.core.distributed import pick_device
from loupe.core.errors import ConfigError
from loupe.core.evaluation import EvalConfig, evaluation_report, log_report
from loupe.core.models.classifier import build_model, save_model
from loupe.core.recipes import Recipe, RunConfig, model_signature, register_recipe, resolve_init
from loupe.core.registry import MODELS
from loupe.domains.pathology.data import PatchData, load_patch_manifest
from loupe.domains.pathology.features import embed_slide, model_fingerprint
from loupe.domains.pathology.models import pathology_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagData(PatchData):
    """A manifest of slides / large images (one bag each) and how to tile them (``unit_options``: ``tile_mpp``,
    ``slide_mpp`` for images that state no resolution, ``qc.*``)."""

    manifest: str = "../shared/data/pathology/monuseg/tiles.csv"
    unit_options: dict[str, Any] = field(default_factory=dict)
    batch_tiles: int = 64


@dataclass(frozen=True)
class MILModelConfig:
    backbone: str = "path_vit_micro_patch8"
    img_size: int = 64
    tile_mpp: float = 0.5
    init: str = ""
    init_layout: str = "mae"
    head: str = "gated"  # gated (ABMIL) | transformer
    hidden: int = 128

    def problems(self) -> list[str]:
        out = [] if self.backbone in MODELS else [f"backbone: {self.backbone!r} is not registered"]
        if self.head not in ("gated", "transformer"):
            out.append(f"head: expected gated or transformer, got {self.head!r}")
        return out


@dataclass(frozen=True)
class MILTrain:
    epochs: int = 60
    lr: float = 5e-4
    weight_decay: float = 1e-4
    threads: int = 0
    heatmaps: int = 4
    instance_dropout: float = 0.0  # share of a training bag's tiles left out at each step (bag augmentation)

    def problems(self) -> list[str]:
        out = [] if self.epochs >= 1 and self.lr > 0 else ["epochs must be >= 1 and lr > 0"]
        if not 0.0 <= self.instance_dropout < 1.0:
            out.append(f"instance_dropout must be in [0, 1), got {self.instance_dropout}")
        return out


@dataclass(frozen=True)
class MILConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="pathology-mil"))
    data: BagData = field(default_factory=BagData)
    model: MILModelConfig = field(default_factory=MILModelConfig)
    train: MILTrain = field(default_factory=MILTrain)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(n_boot=1000))


@register_recipe("pathology.mil", domain="pathology")
class MILRecipe(Recipe):
    """Attention MIL on cached tile features: slides (or large images) of a manifest as bags."""

    config_cls = MILConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.run.device)
        self.out = self.output_dir(cfg.run.name or "pathology_mil")
        self.frame, self.classes = load_patch_manifest(cfg.data, cfg.run.seed)
        m = cfg.model
        source = resolve_init(m.init, self.tracker, self.out / "init")
        self.spec = pathology_spec(cfg.run.name or "pathology_mil", m.backbone, self.classes, tile_px=m.img_size,
                                   tile_mpp=m.tile_mpp, aggregation="attention", outputs=("scores", "attention"),
                                   model_kwargs={"head": "mil", "mil": m.head, "mil_hidden": m.hidden},
                                   source=source, layout=m.init_layout if source else "loupe")  # fmt: skip
        self.spec = self.spec.replace(unit_options={**self.spec.unit_options, **cfg.data.unit_options})
        self.model, report = build_model(self.spec)
        self.load_report = report.summary() if report else "random init"
        self.model.to(self.device).eval()
        self.bags = self._embed_all()

    def _embed_all(self) -> dict[str, dict[str, Any]]:
        """Every manifest row's bag: features (cached per slide), rectangles, label, split, group."""
        fp = model_fingerprint(self.model.backbone)
        bags, t0, cached = {}, time.time(), 0
        for row in self.frame.itertuples():
            path = Path(self.cfg.data.root) / row.path
            sf = embed_slide(path, self.model, self.spec, fingerprint=fp, batch_size=self.cfg.data.batch_tiles,
                             num_workers=self.cfg.data.num_workers, device=self.device)  # fmt: skip
            cached += sf.from_cache
            if len(sf.features) == 0:
                log.warning("%s: no tile passed quality control; the bag is left out", row.path)
                continue
            label = int(self.frame.loc[row.Index, list(self.classes)].to_numpy().argmax())
            bags[row.path] = {"x": torch.from_numpy(sf.features), "rects": sf.rects, "split": row.split, "y": label,
                              "group": getattr(row, "group", row.path), "path": path}  # fmt: skip
        self.embed_seconds, self.cached = round(time.time() - t0, 1), cached
        return bags

    def _split(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bags.values() if b["split"] == name]

    def train(self) -> dict[str, Any]:
        t0 = time.time()
        train, val, test = self._split("train"), self._split("val"), self._split("test")
        if not train or not test:
            raise ConfigError(f"the manifest needs train and test bags (got {len(train)} / {len(test)})")
        with self.tracked_run() as run:
            run.set_tags({"init": self.cfg.model.init or "random", "mil_head": self.cfg.model.head})
            run.log_metrics({"embed_seconds": self.embed_seconds, "bags_from_cache": self.cached,
                             "tiles_per_bag": float(np.mean([len(b["x"]) for b in self.bags.values()]))})  # fmt: skip
            best = self._fit(run, train, val or train)
            self.model.mil.load_state_dict(best)
            result = self._finish(run, test, train)
            result["train_seconds"] = round(time.time() - t0, 1)
            return result

    def _fit(self, run, train: list[dict], val: list[dict]) -> dict[str, torch.Tensor]:
        from loupe.core.metrics import macro_auroc

        head = self.model.mil
        opt = torch.optim.AdamW(head.parameters(), lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay)
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        best, best_auc, drop = None, -1.0, self.cfg.train.instance_dropout
        for epoch in range(self.cfg.train.epochs):
            head.train()
            total = 0.0
            for i in torch.randperm(len(train), generator=g).tolist():
                bag = train[i]
                x = bag["x"]
                if drop and len(x) > 1:
                    keep = max(1, round(len(x) * (1 - drop)))
                    x = x[torch.randperm(len(x), generator=g)[:keep]]
                loss = F.cross_entropy(head(x.to(self.device))["logits"][None],
                                       torch.tensor([bag["y"]], device=self.device))  # fmt: skip
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss)
            S, Y = self._predict(val)
            auc = float(macro_auroc(Y, S))
            auc = -np.inf if np.isnan(auc) else auc
            run.log_metrics({"train_loss": total / len(train), "val_macro_auroc": auc}, step=epoch)
            if auc >= best_auc:
                best_auc, best = auc, {k: v.detach().clone() for k, v in head.state_dict().items()}
                self.best_epoch = epoch
        self.best_val = best_auc
        return best

    @torch.no_grad()
    def _predict(self, bags: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        head = self.model.mil.eval()
        S = np.stack([head(b["x"].to(self.device))["logits"].softmax(-1).cpu().numpy() for b in bags])
        Y = np.eye(len(self.classes))[[b["y"] for b in bags]]
        return S, Y

    def _finish(self, run, test: list[dict], train: list[dict]) -> dict[str, Any]:
        S, Y = self._predict(test)
        groups = np.array([str(b["group"]) for b in test])
        report = evaluation_report(Y, S, self.classes, cfg=self.cfg.eval, groups=groups)
        accuracy = float((S.argmax(1) == Y.argmax(1)).mean())
        baselines = mean_pool_baseline(train, test, self.classes, self.cfg.eval)
        majority = int(np.bincount([b["y"] for b in train]).argmax())
        baselines["baseline_majority_accuracy"] = float(np.mean([b["y"] == majority for b in test]))
        report.metrics |= {"test_accuracy": accuracy, **baselines}
        log_report(run, report, self.out / "evaluation")
        if self.cfg.train.heatmaps:
            run.log_figure(attention_figure(self.model.mil, test[: self.cfg.train.heatmaps], self.classes),
                           "mil/attention_heatmaps.png")  # fmt: skip
        # the slides' own resolution is the data's, not the model's: scoring other slides must not inherit it
        units = {k: v for k, v in self.spec.unit_options.items() if k != "slide_mpp"}
        spec = self.spec.replace(source=None, layout="loupe", unit_options=units)
        model_dir = save_model(self.model, spec, self.out / "model")
        run.log_dict(model_signature(spec), "model/signature.json")
        run.log_model_dir(model_dir)
        m = report.metrics
        return {"run_id": run.run_id, "best_epoch": self.best_epoch, "val_macro_auroc": self.best_val,
                "test_macro_auroc": m["test_macro_auroc"], "test_macro_auroc_ci": [m["test_macro_auroc_ci_low"],
                m["test_macro_auroc_ci_high"]], "test_accuracy": accuracy, **baselines, "n_test": len(test),
                "n_train": len(train), "classes": list(self.classes), "model_dir": str(model_dir),
                "embed_seconds": self.embed_seconds, "weights_load": self.load_report}  # fmt: skip


def mean_pool_baseline(train: list[dict], test: list[dict], classes, cfg: EvalConfig) -> dict[str, float]:
    """MIL without attention: each bag's mean feature, a logistic regression; test macro AUROC (CI) and accuracy."""
    from sklearn.linear_model import LogisticRegression

    from loupe.core.metrics import per_label_auroc_ci

    xtr = np.stack([b["x"].mean(0).numpy() for b in train])
    ytr = np.array([b["y"] for b in train])
    xte = np.stack([b["x"].mean(0).numpy() for b in test])
    yte = np.array([b["y"] for b in test])
    if len(set(ytr)) < 2:
        return {}
    clf = LogisticRegression(max_iter=5000, C=1.0).fit(xtr, ytr)
    proba = np.zeros((len(xte), len(classes)))
    proba[:, clf.classes_] = clf.predict_proba(xte)
    table = per_label_auroc_ci(np.eye(len(classes))[yte], proba, classes, n_boot=cfg.n_boot, seed=0)
    macro = table.set_index("label").loc["macro"]
    return {"baseline_meanpool_macro_auroc": float(macro["auroc"]), "baseline_meanpool_ci_low":
            float(macro["ci_low"]), "baseline_meanpool_ci_high": float(macro["ci_high"]),
            "baseline_meanpool_accuracy": float((proba.argmax(1) == yte).mean())}  # fmt: skip


@torch.no_grad()
def attention_figure(head, bags: list[dict], classes):
    """Each bag's thumbnail with the attention of its tiles (red = most attended) and the predicted class."""
    from matplotlib.figure import Figure

    from loupe.core.io.slides import open_slide

    fig = Figure(figsize=(4 * len(bags), 4.4), layout="constrained")
    axes = fig.subplots(1, len(bags), squeeze=False)[0]
    for ax, b in zip(axes, bags, strict=True):
        out = head.eval()(b["x"])
        att = out["attention"].numpy()
        with open_slide(b["path"]) as slide:
            thumb = slide.thumbnail(512)
            w0 = slide.dimensions[0]
        s = thumb.shape[1] / w0
        ax.imshow(thumb)
        for (x, y, w, h), a in zip(b["rects"], att / att.max(), strict=True):
            ax.add_patch(_rect(x * s, y * s, w * s, h * s, a))
        pred = classes[int(out["logits"].argmax())]
        ax.set_title(f"{b['path'].name[:24]}\ntrue {classes[b['y']]}, predicted {pred}", fontsize=8)
        ax.axis("off")
    return fig


def _rect(x, y, w, h, a):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=(1, 0, 0, 0.6 * float(a)), edgecolor="none")
