"""Review cases: one predictions row (with its unit rows) as plain data a reviewer's screen can be drawn from.

A `ReviewCase` holds the base image layers (a film with its window/level defaults, a slide thumbnail, an image,
video frames), overlays placed by their coordinate frame (a probability mask, Grad-CAM maps over their region, a
grid of unit scores, boxes), the findings with their scores and the model's stored thresholds, the model and
input identity the scores came from, and non-identifying metadata. Domains register a builder
(``DomainInfo.review_case``); `default_case` serves any domain from the predictions contract alone. Nothing here
draws: ``apps/`` renders any case with `render_layer` / `load_overlay` and its own widgets, and no domain ever
imports streamlit.

Coordinates: a layer's ``frame`` is ``{"width": W, "height": H}`` in the file's pixels. An overlay's ``frame`` is
``{"space": "file", "scale": s}`` (overlay pixel = file pixel x s), ``{"space": "region", "region": [x, y, w,
h]}`` (the overlay spans that part of the file), or ``{"space": "cells"}`` (``cells`` carry their own regions).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Metadata keys never shown (processing detail kept in the table for tracing, not for the reviewer's panel).
_HIDDEN_META = ("pipeline",)


@dataclass(frozen=True)
class Layer:
    """A base image: ``kind`` ``film`` (grey radiograph, window/level applies), ``image``, ``slide`` or
    ``frames``; ``source`` the file to read; ``window`` the default (centre, width) on display intensities 0..1."""

    name: str
    kind: str
    source: str
    frame: dict[str, Any] | None = None
    window: tuple[float, float] | None = None
    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class Overlay:
    """Something drawn over a layer: ``mask`` / ``heatmap`` (a 16-bit PNG of values in 0..1 at ``path``),
    ``grid`` / ``boxes`` (``cells``: ``{"region": [x, y, w, h], "value": v, "label": ...}``)."""

    name: str
    kind: str
    frame: dict[str, Any]
    path: str | None = None
    cells: tuple[dict[str, Any], ...] = ()
    opacity: float = 0.4
    colormap: str = "inferno"
    threshold: float | None = None
    visible: bool = True


@dataclass(frozen=True)
class Finding:
    """A model statement a reviewer accepts, rejects or relabels: ``label`` scored ``score`` against the model's
    stored ``threshold`` (``decision`` = score ≥ threshold), for the whole file or one unit."""

    label: str
    score: float | None
    threshold: float | None
    decision: bool | None
    level: str = "file"
    unit: int | None = None

    @property
    def margin(self) -> float | None:
        """Distance to the threshold (small = uncertain)."""
        return None if self.score is None or self.threshold is None else abs(self.score - self.threshold)


@dataclass(frozen=True)
class ReviewCase:
    domain: str
    case_id: str  # the content identity: the same bytes are the same case, whatever the path
    path: str  # as recorded in the table (relative to the input root)
    source: str  # where to read it now
    status: str
    model: dict[str, str]
    layers: tuple[Layer, ...] = ()
    overlays: tuple[Overlay, ...] = ()
    findings: tuple[Finding, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    timeline: tuple[dict[str, Any], ...] = ()  # per frame / time point: {"time_s", "frame_index", "score", "label"}
    highlights: tuple[dict[str, Any], ...] = ()  # regions to look at closely: {"region", "score", "label", "unit"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReviewCase:
        d = dict(d)
        d["layers"] = tuple(Layer(**{**x, "window": _tuple(x.get("window")), "frames": tuple(x.get("frames", ()))})
                            for x in d.get("layers", ()))  # fmt: skip
        d["overlays"] = tuple(Overlay(**{**x, "cells": tuple(x.get("cells", ()))}) for x in d.get("overlays", ()))
        d["findings"] = tuple(Finding(**x) for x in d.get("findings", ()))
        d["timeline"] = tuple(d.get("timeline", ()))
        d["highlights"] = tuple(d.get("highlights", ()))
        return cls(**d)


@dataclass(frozen=True)
class CaseContext:
    """Where a row's files are: the input root of its table and the table's folder (artifact paths start there)."""

    input_root: Path
    table_dir: Path

    def source(self, recorded: str) -> Path:
        p = Path(recorded)
        return p if p.is_absolute() else self.input_root / p

    def artifact(self, rel: str) -> Path:
        return self.table_dir / rel


MODEL_KEYS = ("model_name", "model_version", "model_source", "weights_sha256", "preprocessing_hash", "aggregation")


def findings_from(row: dict[str, Any], level: str = "file", unit: int | None = None) -> tuple[Finding, ...]:
    """One finding per scored label of a file or unit row (its ``scores`` / ``decisions`` maps and stored
    thresholds)."""
    scores = dict(row.get("scores") or ())
    decisions = dict(row.get("decisions") or ())
    thresholds = json.loads(row["thresholds"]) if row.get("thresholds") else {}
    return tuple(
        Finding(lb, _num(scores.get(lb)), _num(thresholds.get(lb)), decisions.get(lb), level, unit) for lb in scores
    )  # a failed row has no scores, hence no findings: there is nothing the model said


def default_case(row: dict[str, Any], units: list[dict[str, Any]], ctx: CaseContext, domain: str = "") -> ReviewCase:
    """A review case from the predictions contract alone: the image, its mask / Grad-CAM / unit-grid overlays,
    the file's findings, metadata, and a timeline when units carry times."""
    meta = {k: v for k, v in json.loads(row.get("meta") or "{}").items() if k not in _HIDDEN_META}
    frame = json.loads(row["frame"]) if row.get("frame") else None
    layer = Layer("image", "image", str(ctx.source(row["path"])), frame)
    return ReviewCase(
        domain=domain or str(row.get("domain") or ""),
        case_id=str(row.get("content_id") or row["path"]),
        path=row["path"],
        source=layer.source,
        status=str(row.get("status")),
        model={k: str(row.get(k)) for k in MODEL_KEYS if row.get(k) is not None},
        layers=(layer,),
        overlays=artifact_overlays(row, ctx) + unit_overlays(units),
        findings=findings_from(row),
        metadata=meta,
        timeline=unit_timeline(units),
    )


def artifact_overlays(row: dict[str, Any], ctx: CaseContext) -> tuple[Overlay, ...]:
    """Overlays for the row's stored artifacts (masks, Grad-CAM maps), paths resolved against the table folder."""
    out = []
    for ref in json.loads(row.get("artifacts") or "[]"):
        if ref.get("kind") == "mask":
            out.append(Overlay("mask", "mask", ref["frame"], str(ctx.artifact(ref["path"])), opacity=0.45,
                               colormap="reds", threshold=ref.get("threshold")))  # fmt: skip
        elif ref.get("kind") == "gradcam":
            name = f"Grad-CAM ({ref.get('label')})"
            out.append(Overlay(name, "heatmap", ref["frame"], str(ctx.artifact(ref["path"])), opacity=0.4))
        elif ref.get("kind") == "heatmap":  # tile values painted over the file (hidden: the unit grid shows them)
            out.append(Overlay(f"heatmap {ref.get('name')}", "heatmap", ref["frame"], str(ctx.artifact(ref["path"])),
                               opacity=0.5, visible=False))  # fmt: skip
    return tuple(out)


def unit_overlays(units: list[dict[str, Any]]) -> tuple[Overlay, ...]:
    """A grid of unit scores for units with regions (tiles), boxes for units with boxes (faces); per label, the
    one whose units score highest first."""
    placed = [u for u in units if u.get("x") is not None and u.get("width") is not None]
    if not placed:
        return ()
    labels = list(dict(next((u["scores"] for u in placed if u.get("scores")), ()) or ()))
    out = []
    for lb in sorted(labels, key=lambda lb: -max(dict(u.get("scores") or ()).get(lb, -1) for u in placed)):
        cells = tuple(
            {"region": [u["x"], u["y"], u["width"], u["height"]], "value": dict(u.get("scores") or ()).get(lb),
             "label": lb, "unit": u["unit"], "status": u.get("status")}
            for u in placed
        )  # fmt: skip
        out.append(Overlay(f"units: {lb}", "grid", {"space": "cells"}, cells=cells, visible=not out))
    boxes = tuple({"region": [u["box_x"], u["box_y"], u["box_width"], u["box_height"]], "unit": u["unit"],
                   "value": max(dict(u.get("scores") or {"": None}).values(), default=None)}
                  for u in units if u.get("box_x") is not None)  # fmt: skip
    if boxes:
        out.append(Overlay("boxes", "boxes", {"space": "cells"}, cells=boxes))
    return tuple(out)


def unit_timeline(units: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Per unit with a time: its time, frame and highest label score (what a video timeline plots)."""
    timed = sorted((u for u in units if u.get("time_s") is not None), key=lambda u: (u["time_s"], u["unit"]))
    out = []
    for u in timed:
        scores = dict(u.get("scores") or ())
        label, score = max(scores.items(), key=lambda kv: kv[1]) if scores else (None, None)
        out.append({"time_s": u["time_s"], "frame_index": u.get("frame_index"), "unit": u["unit"],
                    "label": label, "score": score, "status": u.get("status")})  # fmt: skip
    return tuple(out)


# ------------------------------------------------------------------------------------------- pixels for display
def render_layer(layer: Layer, max_side: int = 1024) -> np.ndarray:
    """A layer's pixels for display, downsampled so the longer side is at most ``max_side`` (the file is never
    changed): grey ``[H, W]`` or RGB ``[H, W, 3]`` floats in 0..1."""
    from loupe.core.io import read_any

    img = read_any(layer.source)
    a = img.array
    if a.ndim >= 3 and img.meta.get("frames", 1) > 1:
        a = a[0]
    if np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(2 ** int(img.meta.get("bit_depth") or 8) - 1)
    a = np.clip(a.astype(np.float32), 0.0, 1.0)
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = a[..., :-1]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return downsample(a, max_side)


def read_highlight(source: str, region: list[int] | tuple[int, ...], max_side: int = 512) -> np.ndarray:
    """A region of the case's file (a slide's tile at full resolution, or an image's crop) for display, RGB floats
    0..1 with its longer side at most ``max_side``."""
    from loupe.core.io.slides import open_slide

    x, y, w, h = (int(v) for v in region)
    with open_slide(source) as slide:
        level = slide.best_level(max(w, h) / max_side)
        d = slide.level_downsamples[level]
        rgb = slide.read_region((x, y), level, (max(1, round(w / d)), max(1, round(h / d))))
    return downsample(rgb.astype(np.float32) / 255.0, max_side)


def downsample(a: np.ndarray, max_side: int) -> np.ndarray:
    """Area-downsample ``a`` (``[H, W]`` or ``[H, W, C]``) so its longer side is at most ``max_side``."""
    import torch
    import torch.nn.functional as F

    h, w = a.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return t[0, 0].numpy() if a.ndim == 2 else t[0].permute(1, 2, 0).numpy()


def apply_window(gray: np.ndarray, center: float, width: float) -> np.ndarray:
    """Window/level on display intensities 0..1: ``center ± width / 2`` stretched to 0..1."""
    width = max(float(width), 1e-6)
    return np.clip((gray - (center - width / 2)) / width, 0.0, 1.0)


def load_overlay(overlay: Overlay) -> np.ndarray:
    """A mask / heatmap overlay's values (0..1, float32), from its 16-bit PNG."""
    from loupe.core.io.maps import load_map

    return load_map(overlay.path)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _tuple(v: Any) -> tuple[float, float] | None:
    return None if v is None else (float(v[0]), float(v[1]))
