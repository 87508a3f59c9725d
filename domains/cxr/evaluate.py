"""``cxr.evaluate``: score a trained model on a labelled split and log the report a radiologist would trust.

Per-finding AUROC with patient-level (cluster) bootstrap 95 % CIs, macro AUROC, sensitivity / specificity at the
operating thresholds stored in the model's weight spec (or chosen now on the validation split), ECE with a
reliability plot, ROC curves, and subgroup tables by sex, age band and view position with the gap to the
overall AUROC — tables as CSV artifacts, figures as images, headline numbers as metrics.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loupe.core.distributed import pick_device
from loupe.core.errors import ConfigError
from loupe.core.evaluation import EvalConfig, choose_thresholds, evaluation_report, log_report, predict
from loupe.core.models.classifier import load_model_dir
from loupe.core.recipes import Recipe, RunConfig, register_recipe
from loupe.core.registry import LABEL_SETS
from loupe.domains.cxr.common import build_split, cxr_eval, loader
from loupe.domains.cxr.data import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalModel:
    """``source``: a Loupe model folder (``local-dir:/path``) or an MLflow URI (``models:/NAME@alias``,
    ``runs:/ID/model``). ``thresholds``: ``spec`` (the stored ones) or ``val`` (choose on the validation split)."""

    source: str = ""
    thresholds: str = "spec"

    def problems(self) -> list[str]:
        out = []
        if not self.source:
            out.append("source is required: local-dir:/path/to/model, models:/NAME@alias or runs:/ID/model")
        elif not self.source.startswith(("local-dir:", "models:/", "runs:/")):
            out.append(f"source {self.source!r}: expected local-dir:/path, models:/NAME@alias or runs:/ID/model")
        if self.thresholds not in ("spec", "val"):
            out.append(f"thresholds: expected spec or val, got {self.thresholds!r}")
        return out


@dataclass(frozen=True)
class EvaluateConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="cxr"))
    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            source="manifest", path="../shared/data/cxr/nih14/labels.csv", label_set="cxr.nih14", batch_size=32
        )
    )
    model: EvalModel = field(default_factory=EvalModel)
    split: str = "test"
    eval: EvalConfig = field(default_factory=cxr_eval)

    def problems(self) -> list[str]:
        ok = self.split in ("train", "val", "test", "all")
        return [] if ok else [f"split: expected train, val, test or all, got {self.split!r}"]


@register_recipe("cxr.evaluate", domain="cxr")
class EvaluateRecipe(Recipe):
    """Per-finding AUROC with bootstrap CIs, thresholds, calibration and subgroup tables for a trained model."""

    config_cls = EvaluateConfig

    def setup(self) -> None:
        self.device = pick_device(self.cfg.run.device)
        self.out = self.output_dir(self.cfg.run.name or "cxr_evaluate")
        self._tmp = tempfile.TemporaryDirectory(prefix="loupe-cxr-")
        src = self.cfg.model.source
        path = Path(src.removeprefix("local-dir:")) if src.startswith("local-dir:") else None
        if path is None:
            path = self.tracker.resolve_model_uri(src, Path(self._tmp.name))
        self.model, self.spec = load_model_dir(path)
        self.model.to(self.device)
        names = tuple(LABEL_SETS.get(self.cfg.data.label_set))
        if tuple(self.spec.label_names) != names:
            raise ConfigError(
                f"the model predicts {list(self.spec.label_names)} but data.label_set {self.cfg.data.label_set!r} "
                f"is {list(names)}; evaluate with the label set the model was trained on"
            )

    def evaluate(self) -> dict[str, Any]:
        from loupe.domains.cxr.manifests import subgroup_frame

        cfg, names = self.cfg, self.spec.label_names
        thresholds = dict(self.spec.thresholds)
        if cfg.model.thresholds == "val":
            S_val, Y_val, _ = predict(self.model, self._loader("val"), self.device)
            thresholds = choose_thresholds(Y_val, S_val, names, cfg.eval)
        ds = build_split(cfg.data, self.spec, "all" if cfg.split == "all" else cfg.split)
        S, Y, _ = predict(self.model, loader(ds, cfg.data, _single(), train=False, seed=0), self.device)
        meta = subgroup_frame(ds)
        groups = meta["group"].to_numpy() if "group" in meta else None
        report = evaluation_report(Y, S, names, cfg=cfg.eval, thresholds=thresholds, meta=meta, groups=groups,
                                   prefix=cfg.split)  # fmt: skip
        with self.tracked_run() as run:
            run.set_tags({"model_source": cfg.model.source, "model_name": self.spec.name})
            log_report(run, report, self.out / "evaluation", prefix=cfg.split)
            run.log_dict({"thresholds": thresholds, "n_images": len(ds)}, "evaluation/thresholds.json")
            return {
                "run_id": run.run_id,
                "n_images": len(ds),
                "metrics": report.metrics,
                "per_finding_csv": str(self.out / "evaluation" / f"{cfg.split}_per_finding.csv"),
                "subgroups_csv": str(self.out / "evaluation" / f"{cfg.split}_subgroups.csv"),
            }

    def _loader(self, split: str):
        return loader(build_split(self.cfg.data, self.spec, split), self.cfg.data, _single(), train=False, seed=0)

    def cleanup(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()


def _single():
    from loupe.core.distributed import DistInfo

    return DistInfo()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from loupe.domains.cxr.finetune import main as run_main

    return run_main(list(sys.argv[1:] if argv is None else argv), mode="evaluate")
