"""Localisation data and metrics: the mask manifest, the shared layouts (CASIA v1 side-by-side panels, CASIA v2,
NoSo), seeded group splits, the training dataset, pixel F1 / IoU with bootstrap CIs, and the two baselines (the
all-tampered mask and a noise-residual inconsistency map)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from loupe.core.errors import ConfigError
from loupe.domains.forensics.localizer import LABEL

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- data and sources
def read_mask(path: str | Path) -> np.ndarray:
    """A ground-truth PNG as bool ``[H, W]``: white (> 127 in any colour channel, alpha ignored) = tampered."""
    from loupe.core.io import read_any

    a = np.asarray(read_any(path).array)
    a = a[..., :3].max(-1) if a.ndim == 3 else a
    return a > (127 if a.dtype == np.uint8 else 0.5 * (np.iinfo(a.dtype).max if a.dtype.kind == "u" else 1.0))


def _rgb8(path: str | Path) -> np.ndarray:
    from loupe.core.io import read_any
    from loupe.domains.forensics.robustness import as_rgb8

    return as_rgb8(read_any(path).array)


_ID = re.compile(r"[a-z]{3}\d{4,5}")


def casia_groups(names: list[str], prefix: str) -> list[str]:
    """A group per file such that files sharing a source or target picture id (``pla0005``, CASIA's names) are one
    group (union-find over the ids), so a picture and the splices made of it never straddle a split."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    ids = [_ID.findall(n) or [n] for n in names]
    for group in ids:
        for other in group[1:]:
            parent[find(other)] = find(group[0])
    roots = [find(g[0]) for g in ids]
    first = {r: min(g[0] for g, rr in zip(ids, roots, strict=True) if rr == r) for r in set(roots)}
    return [f"{prefix}:{first[r]}" for r in roots]


def casia1(folder: str | Path, workdir: str | Path) -> pd.DataFrame:
    """CASIA 1.0 ground-truth samples (``*_combine.png``: [tampered | original | mask] side by side, equal widths)
    → the three panels written under ``workdir`` and rows ``path, mask, label, group, source``: the tampered panel
    with its mask (label 1) and the original panel, authentic, with no mask (label 0), in one group."""
    from PIL import Image

    files = sorted(Path(folder).rglob("*_combine.png"))
    if not files:
        raise ConfigError(f"{folder}: no *_combine.png files; point at CASIA 1.0's groundtruth samples folder")
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in files:
        a = _rgb8(f)
        if a.shape[1] % 3:
            raise ConfigError(f"{f}: width {a.shape[1]} is not three equal panels [tampered | original | mask]")
        w, stem = a.shape[1] // 3, f.stem.removesuffix("_combine")
        tampered, original, mask = (out / f"{stem}_{k}.png" for k in ("tampered", "original", "mask"))
        Image.fromarray(a[:, :w]).save(tampered)
        Image.fromarray(a[:, w : 2 * w]).save(original)
        Image.fromarray((a[:, 2 * w :].max(-1) > 127).astype(np.uint8) * 255).save(mask)
        rows += [{"path": str(tampered.resolve()), "mask": str(mask.resolve()), "label": 1, "name": stem},
                 {"path": str(original.resolve()), "mask": "", "label": 0, "name": stem}]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["group"] = casia_groups(frame["name"].tolist(), "casia1")
    return frame.drop(columns="name").assign(source="casia1")


def casia2(folder: str | Path, workdir: str | Path | None = None) -> pd.DataFrame:
    """CASIA 2.0 ground truth (``Tp_*.jpg|tif`` + ``Tp_*_gt.png``) → tampered rows ``path, mask, label, group``."""
    root = Path(folder)
    rows = []
    for f in sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".tif", ".tiff", ".png")):
        if f.stem.endswith("_gt"):
            continue
        gt = f.with_name(f"{f.stem}_gt.png")
        if not gt.is_file():
            raise ConfigError(f"{f}: its ground truth {gt.name} is missing beside it (CASIA 2.0 groundtruth layout)")
        rows.append({"path": str(f.resolve()), "mask": str(gt.resolve()), "label": 1, "name": f.stem})
    if not rows:
        raise ConfigError(f"{folder}: no tampered images with a _gt.png beside them")
    frame = pd.DataFrame(rows)
    frame["group"] = casia_groups(frame["name"].tolist(), "casia2")
    return frame.drop(columns="name").assign(source="casia2")


def noso(folder: str | Path, workdir: str | Path | None = None) -> pd.DataFrame:
    """The NoSo copy-move set (``NN.png`` authentic, ``NN_mod[_K].png`` forged with ``NN_mod[_K]_gt.png``) → rows
    ``path, mask, label, group`` (group: the authentic picture ``NN`` a forgery was made from)."""
    root = Path(folder)
    root = root / "NoSo_dataset" if (root / "NoSo_dataset").is_dir() else root
    rows = []
    for f in sorted(root.glob("*.png")):
        m = re.fullmatch(r"(\d+)(_mod(?:_\d+)?)?", f.stem)
        if m is None:
            continue
        gt = f.with_name(f"{f.stem}_gt.png")
        if m.group(2) and not gt.is_file():
            raise ConfigError(f"{f}: a forgery without its ground truth {gt.name}")
        rows.append({"path": str(f.resolve()), "mask": str(gt.resolve()) if m.group(2) else "",
                     "label": int(bool(m.group(2))), "group": f"noso:{m.group(1)}"})  # fmt: skip
    if not rows:
        raise ConfigError(f"{folder}: no NN.png / NN_mod.png pictures (the NoSo copy-move layout)")
    return pd.DataFrame(rows).assign(source="noso")


#: Shared layouts: name → (adapter(folder, workdir), folder under ``data.shared_root``).
SOURCES = {"casia1": (casia1, "casia1/samples"), "casia2": (casia2, "casia2/samples"),
           "noso": (noso, "noso_copymove/NoSo_dataset")}  # fmt: skip
_TAMPERED, _AUTHENTIC = {"1", "tampered", "forged", "fake", "manipulated"}, {"0", "authentic", "real", "original"}


def read_mask_manifest(path: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """A manifest ``path, mask[, label, split, group]`` → ``path`` and ``mask`` absolute ('' = no mask: authentic,
    all zero), ``Manipulated`` 1.0 / 0.0 (from ``label``, else: has a mask), ``group`` (default: the path)."""
    from loupe.core.data import read_manifest

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest {str(p)!r} does not exist; pass a CSV/Parquet with path, mask[, label, split]")
    frame = read_manifest(p)
    if not {"path", "mask"} <= set(frame.columns):
        raise ConfigError(f"manifest {p} needs columns path and mask (mask empty for authentic images), got "
                          f"{list(frame.columns)}")  # fmt: skip
    base = Path(root) if root else p.parent
    resolve = lambda v: "" if pd.isna(v) or not str(v).strip() else str(base / str(v).strip())  # noqa: E731
    frame["path"], frame["mask"] = frame["path"].map(resolve), frame["mask"].map(resolve)
    if "label" in frame.columns:
        keys = frame["label"].map(lambda v: str(int(v)) if isinstance(v, (int, float)) and v == v else str(v).lower())
        bad = sorted(set(keys) - _TAMPERED - _AUTHENTIC)
        if bad:
            raise ConfigError(f"manifest {p}: label values {bad}; use 1/0, tampered/authentic")
        frame[LABEL] = keys.isin(_TAMPERED).astype(float)
    else:
        frame[LABEL] = (frame["mask"] != "").astype(float)
    unmasked = frame[(frame[LABEL] == 1) & (frame["mask"] == "")]
    if len(unmasked):
        raise ConfigError(f"manifest {p}: {len(unmasked)} tampered rows have no mask (e.g. {unmasked['path'].iloc[0]})"
                          "; localisation needs the ground truth of every tampered image")  # fmt: skip
    if "group" not in frame.columns:
        frame["group"] = frame["path"]
    return frame


def assign_splits(frame: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int) -> pd.DataFrame:
    """Keep a ``split`` column, else a seeded split by group (stratified by ``Manipulated``); without ``val`` rows,
    ``val_fraction`` of train (by group) becomes validation."""
    from loupe.core.data.splits import split_by_group

    frame = frame.reset_index(drop=True)
    if "split" not in frame.columns:
        frame = split_by_group(frame, {"train": 1 - test_fraction, "test": test_fraction}, seed=seed, labels=[LABEL])
    if not (frame["split"] == "val").any():
        train = frame[frame["split"] == "train"]
        carved = split_by_group(train, {"train": 1 - val_fraction, "val": val_fraction}, seed=seed, labels=[LABEL])
        frame.loc[carved.index, "split"] = carved["split"]
    for s in ("train", "val", "test"):
        if not (frame["split"] == s).any() or not frame.loc[frame["split"] == s, LABEL].eq(1).any():
            raise ConfigError(f"the {s} split holds no tampered image; add rows or change data.test_fraction / "
                              "val_fraction")  # fmt: skip
    return frame


@dataclass(frozen=True)
class Augment:
    """Paired (image and mask) training augmentation: horizontal ``flip`` probability, and a random crop of each
    side to a fraction in [``crop_scale``, 1] (1 = no crop) before the squash."""

    flip: float = 0.5
    crop_scale: float = 0.7

    def problems(self) -> list[str]:
        ok = 0.0 <= self.flip <= 1.0 and 0.0 < self.crop_scale <= 1.0
        return [] if ok else [f"flip must be in [0, 1] and crop_scale in (0, 1], got {self.flip}, {self.crop_scale}"]

    def __call__(self, a: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = m.shape
        if self.crop_scale < 1.0:
            ch, cw = (max(8, round(n * (self.crop_scale + float(torch.rand(())) * (1 - self.crop_scale))))
                      for n in (h, w))  # fmt: skip
            y, x = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
            a, m = a[y : y + ch, x : x + cw], m[y : y + ch, x : x + cw]
        if float(torch.rand(())) < self.flip:
            a, m = a[:, ::-1], m[:, ::-1]
        return np.ascontiguousarray(a), np.ascontiguousarray(m)


class MaskedImages(torch.utils.data.Dataset):
    """Rows ``path, mask, Manipulated`` → ``{"image": [C, S, S] as the spec prepares it, "mask": [1, S, S] 0/1
    (area-resized, >= 0.5), "label": [1], "meta": {"index"}}``; pictures and masks decoded once and kept (uint8)."""

    def __init__(self, rows: pd.DataFrame, spec, augment: Augment | None = None):
        from loupe.core.transforms import ModelInput

        self.rows, self.prep, self.augment = rows.reset_index(drop=True), ModelInput(spec), augment
        self.size = tuple(spec.input_size[1:])
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def picture(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``'s picture (uint8 ``[H, W, 3]``) and ground truth (bool ``[H, W]``, all False without a mask)."""
        if i not in self._cache:
            row = self.rows.iloc[i]
            a = _rgb8(row["path"])
            m = read_mask(row["mask"]) if row["mask"] else np.zeros(a.shape[:2], bool)
            if m.shape != a.shape[:2]:
                raise ConfigError(f"{row['mask']}: mask of {m.shape[1]}x{m.shape[0]} px for a picture of "
                                  f"{a.shape[1]}x{a.shape[0]} ({row['path']}); they must match")  # fmt: skip
            self._cache[i] = (a, m)
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, m = self.picture(i)
        if self.augment is not None:
            a, m = self.augment(a, m)
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        mask = (F.interpolate(t, size=self.size, mode="area")[0] >= 0.5).float()  # [1, S, S]
        label = torch.tensor([float(self.rows.loc[i, LABEL])])
        return {"image": self.prep(a), "mask": mask, "label": label, "meta": {"index": i}}


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([b[k] for b in batch]) for k in ("image", "mask", "label")} | {
        "meta": [b["meta"] for b in batch]}  # fmt: skip


# ------------------------------------------------------------------------------------------ metrics, baselines
def localization_metrics(
    probs: list[np.ndarray],
    gts: list[np.ndarray],
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    mask_threshold: float,
    image_threshold: float,
    n_boot: int = 1000,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Per image ``probs`` ``[H, W]`` (tampering probability on the file's frame), ``gts`` (bool, same shape),
    ``labels`` 1/0 and image ``scores``: the summary and a per-image table.

    Pixel F1 / IoU are means over tampered images (authentic ones have nothing to find) at 0.5 (``*_05``), at the
    stored ``mask_threshold`` (``*_thr``: chosen on validation) and at each image's own best threshold (``*_best``:
    an oracle, optimistic by construction), each with a percentile bootstrap CI over images (by ``groups``);
    ``fp_area_thr`` is the mean share of authentic pixels called tampered; ``image_*`` the detection metrics
    (AUROC with its CI) of the image scores, tampered vs authentic.
    """
    from loupe.core.metrics import best_threshold_f1, bootstrap_ci, pixel_f1_iou
    from loupe.domains.forensics.robustness import detection_metrics

    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    rows = []
    for p, g, y, s in zip(probs, gts, labels, scores, strict=True):
        r: dict[str, float] = {"label": y, "score": s, "gt_fraction": float(g.mean())}
        if y == 1:
            r["f1_05"], r["iou_05"] = pixel_f1_iou(p, g, 0.5)
            r["f1_thr"], r["iou_thr"] = pixel_f1_iou(p, g, mask_threshold)
            r["f1_best"], best = best_threshold_f1(p, g)
            r["iou_best"] = pixel_f1_iou(p, g, best)[1]
        else:
            r["fp_area_thr"] = float((p >= mask_threshold).mean())
        rows.append(r)
    table = pd.DataFrame(rows)
    tampered = (labels == 1).nonzero()[0]
    out: dict[str, float] = {"n_tampered": float(len(tampered)), "n_authentic": float((labels == 0).sum())}
    g = None if groups is None else np.asarray(groups)[tampered]
    for k in ("f1_05", "iou_05", "f1_thr", "iou_thr", "f1_best", "iou_best"):
        if not len(tampered):
            break
        v = table.loc[tampered, k].to_numpy(dtype=float)
        ci = bootstrap_ci(lambda _y, s: float(np.mean(s)), np.zeros_like(v), v, n_boot, alpha, seed, groups=g)
        out |= {f"pixel_{k}": ci.estimate, f"pixel_{k}_ci_low": ci.low, f"pixel_{k}_ci_high": ci.high}
    if (labels == 0).any():
        out["fp_area_thr"] = float(table.loc[labels == 0, "fp_area_thr"].mean())
    if 0 < len(tampered) < len(labels):
        m = detection_metrics(labels, scores, image_threshold, n_boot=n_boot, alpha=alpha, groups=groups, seed=seed)
        out |= {f"image_{k}": m[k] for k in ("auroc", "ci_low", "ci_high", "ap", "accuracy", "eer")}
    return out, table


def noise_residual_map(a: np.ndarray) -> np.ndarray:
    """A learning-free baseline: where the local noise level departs from the picture's own. The residual of a 3x3
    median filter (grey), its local RMS over a window of 1/32 of the shorter side, in log; a robust z-score against
    the picture's median (MAD scale) and ``sigmoid(|z| - 2)``: 0.5 at two robust SDs  # [H, W] in 0..1."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY)
    residual = grey.astype(np.float32) - cv2.medianBlur(grey, 3).astype(np.float32)
    k = max(4, min(grey.shape) // 32)
    energy = np.log(np.sqrt(cv2.blur(residual * residual, (k, k))) + 0.5)
    med = np.median(energy)
    z = (energy - med) / (1.4826 * np.median(np.abs(energy - med)) + 1e-3)
    return (1.0 / (1.0 + np.exp(-(np.abs(z) - 2.0)))).astype(np.float32)


def all_tampered_map(a: np.ndarray) -> np.ndarray:
    """The trivial baseline: every pixel called tampered (F1 = 2p / (1 + p) for a tampered share p)  # [H, W]."""
    return np.ones(a.shape[:2], np.float32)


BASELINES = {"all_tampered": all_tampered_map, "noise_residual": noise_residual_map}


def topk_mean(p: np.ndarray, fraction: float) -> float:
    """The mean of the top ``fraction`` of a map's values: a baseline's image score, as the model's."""
    flat = p.ravel()
    k = max(1, round(fraction * flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


def overlay_figure(picture: np.ndarray, gt: np.ndarray, prob: np.ndarray, title: str):
    """The picture, its ground truth and the predicted probability over it, side by side (matplotlib `Figure`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(picture)
    axes[1].imshow(gt, cmap="gray", vmin=0, vmax=1)
    axes[2].imshow(picture)
    axes[2].imshow(prob, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    for ax, name in zip(axes, ("picture", "ground truth", "predicted"), strict=True):
        ax.set(title=name, xticks=[], yticks=[])
    fig.suptitle(title, fontsize=9)
    return fig
