"""The evaluation tables every classification recipe logs: per-label AUROC with bootstrap 95 % CIs (patient /
slide / video clusters when groups are given), macro AUROC, operating thresholds chosen on validation,
calibration (ECE + reliability plot), ROC curves, and subgroup tables (the attributes a domain names: sex, age
band and view for chest films) with the gap to the overall AUROC. `predict` scores a loader; `evaluation_report`
computes everything from arrays; `log_report` writes it to a tracker run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from loupe.core.errors import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device, task: str = "multilabel"
) -> tuple[np.ndarray, np.ndarray, list]:
    """Scores ``[N, K]`` (sigmoid; softmax for ``multiclass``), labels ``[N, K]`` and per-sample meta over a loader
    of `loupe.core.data.collate_samples` batches (model in eval mode)."""
    from loupe.core.models.heads import to_scores

    model.eval()
    scores, labels, metas = [], [], []
    for batch in loader:
        scores.append(to_scores(model(batch["image"].to(device)), task).cpu())
        labels.append(batch["label"])
        metas.extend(batch["meta"])
    return torch.cat(scores).numpy(), torch.cat(labels).numpy(), metas


@dataclass(frozen=True)
class EvalConfig:
    """``threshold_rule``: ``youden`` or ``sensitivity`` (the lowest threshold reaching ``target_sensitivity``)."""

    n_boot: int = 1000
    alpha: float = 0.05
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.9
    subgroups: tuple[str, ...] = ()
    min_subgroup_n: int = 20
    n_bins: int = 10

    def problems(self) -> list[str]:
        out = []
        if self.threshold_rule not in ("youden", "sensitivity"):
            out.append(f"threshold_rule: expected youden or sensitivity, got {self.threshold_rule!r}")
        if not 0.0 < self.target_sensitivity < 1.0:
            out.append(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")
        if self.n_boot < 1 or not 0.0 < self.alpha < 1.0:
            out.append("n_boot must be >= 1 and alpha in (0, 1)")
        return out


@dataclass
class Report:
    per_finding: pd.DataFrame
    subgroups: pd.DataFrame
    metrics: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict)


def choose_thresholds(Y: np.ndarray, S: np.ndarray, names: tuple[str, ...], cfg: EvalConfig) -> dict[str, float]:
    """One operating threshold per label, on the probability scale, chosen on (validation) labels ``Y``."""
    from loupe.core.metrics import threshold_for_sensitivity, youden_threshold

    out = {}
    for j, name in enumerate(names):
        if cfg.threshold_rule == "youden":
            t = youden_threshold(Y[:, j], S[:, j])
        else:
            t = threshold_for_sensitivity(Y[:, j], S[:, j], cfg.target_sensitivity)
        if t is None or not np.isfinite(t):
            log.warning("no threshold for %s (one class only in validation); skipped", name)
            continue
        out[name] = float(min(1.0, max(0.0, t)))
    return out


def per_finding_table(
    Y: np.ndarray, S: np.ndarray, names: tuple[str, ...], thresholds: dict[str, float], cfg: EvalConfig, groups=None
) -> pd.DataFrame:
    """AUROC + CI per finding (and the macro row), ECE, and sensitivity / specificity at the stored threshold."""
    from loupe.core.metrics import expected_calibration_error, per_label_auroc_ci, threshold_metrics

    table = per_label_auroc_ci(Y, S, names, n_boot=cfg.n_boot, alpha=cfg.alpha, seed=0, groups=groups)
    extra = []
    for j, name in enumerate(names):
        row: dict[str, float] = {"ece": expected_calibration_error(Y[:, j], S[:, j], cfg.n_bins)}
        if name in thresholds:
            tm = threshold_metrics(Y[:, j], S[:, j], thresholds[name])
            row |= {"threshold": thresholds[name], **{k: tm[k] for k in ("sensitivity", "specificity") if k in tm}}
        extra.append(row)
    extra.append({})  # macro row
    return pd.concat([table.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def subgroup_tables(
    Y: np.ndarray, S: np.ndarray, names: tuple[str, ...], meta: pd.DataFrame, cfg: EvalConfig
) -> pd.DataFrame:
    """AUROC per (attribute, group, finding) and its gap to the overall AUROC; absent attributes are skipped."""
    from loupe.core.metrics import subgroup_table

    by = [c for c in cfg.subgroups if c in meta.columns and meta[c].notna().any()]
    skipped = sorted(set(cfg.subgroups) - set(by))
    if skipped:
        log.warning("subgroup attributes %s are not in the data and are skipped", skipped)
    if not by:
        return pd.DataFrame(columns=["attribute", "group", "n", "n_pos", "label", "auroc", "overall_auroc", "gap"])
    return subgroup_table(Y, S, names, meta.reset_index(drop=True), by=by, min_n=cfg.min_subgroup_n)


def evaluation_report(
    Y: np.ndarray,
    S: np.ndarray,
    names: tuple[str, ...],
    *,
    cfg: EvalConfig,
    thresholds: dict[str, float] | None = None,
    meta: pd.DataFrame | None = None,
    groups=None,
    prefix: str = "test",
    figures: bool = True,
) -> Report:
    """Everything above for scores ``S`` ``[N, K]`` against labels ``Y`` ``[N, K]`` (1/0/NaN)."""
    if Y.shape != S.shape or Y.shape[1] != len(names):
        raise ConfigError(f"labels {Y.shape}, scores {S.shape} and {len(names)} label names do not line up")
    thresholds = thresholds or {}
    table = per_finding_table(Y, S, names, thresholds, cfg, groups)
    sub = subgroup_tables(Y, S, names, meta if meta is not None else pd.DataFrame(index=range(len(Y))), cfg)
    macro = table[table["label"] == "macro"].iloc[0]
    metrics = {
        f"{prefix}_macro_auroc": float(macro["auroc"]),
        f"{prefix}_macro_auroc_ci_low": float(macro["ci_low"]),
        f"{prefix}_macro_auroc_ci_high": float(macro["ci_high"]),
        f"{prefix}_mean_ece": float(np.nanmean(table["ece"].to_numpy(dtype=float))),
    }
    for _, r in table[table["label"] != "macro"].iterrows():
        metrics[f"{prefix}_auroc_{r['label']}"] = float(r["auroc"])
    if len(sub):
        macro_gaps = sub[sub["label"] == "macro"]["gap"].abs()
        if len(macro_gaps.dropna()):
            metrics[f"{prefix}_max_subgroup_gap"] = float(macro_gaps.max())
    figs = _figures(Y, S, names, cfg) if figures else {}
    return Report(table, sub, metrics, figs)


def _figures(Y: np.ndarray, S: np.ndarray, names: tuple[str, ...], cfg: EvalConfig) -> dict[str, Any]:
    from matplotlib.figure import Figure

    from loupe.core.metrics import reliability_plot

    figs: dict[str, Any] = {}
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    from sklearn.metrics import roc_curve

    for j, name in enumerate(names):
        k = ~np.isnan(Y[:, j])
        if len(np.unique(Y[k, j])) < 2:
            continue
        fpr, tpr, _ = roc_curve(Y[k, j], S[k, j])
        ax.plot(fpr, tpr, label=name, lw=1)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC per finding")
    ax.legend(fontsize=6, loc="lower right")
    figs["roc.png"] = fig
    k = ~np.isnan(Y)
    figs["reliability.png"] = reliability_plot(Y[k], S[k], cfg.n_bins, title="reliability (all findings pooled)")
    return figs


def log_report(run: Any, report: Report, workdir: Path, prefix: str = "test", step: int | None = None) -> None:
    """Tables as CSV artifacts, figures as images, headline numbers as metrics."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, df in ((f"{prefix}_per_finding.csv", report.per_finding), (f"{prefix}_subgroups.csv", report.subgroups)):
        df.to_csv(workdir / name, index=False)
        run.log_artifact(workdir / name, "evaluation")
    for name, fig in report.figures.items():
        run.log_figure(fig, f"evaluation/{prefix}_{name}")
    run.log_metrics(report.metrics, step=step)
