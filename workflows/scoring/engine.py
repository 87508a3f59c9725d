"""The model side of scoring, shared by both backends: forward a packet's units, then assemble file and unit rows.

`Scorer` runs the model on a packet's images and returns its named outputs as unit results (scores, masks,
embeddings, Grad-CAM maps). `Assembler` collects unit results per file and, when a file's `FileRecord` arrives,
aggregates them as the model's spec says (mean / max / top-k, or the model's attention-MIL head), applies the
stored thresholds per label and level, writes the file's artifacts (Grad-CAM for its `top_units` highest-scoring
units only, tile heatmaps for tiled files), and returns exactly one file row (plus its
unit rows when the domain keeps a unit table). A failed unit is a failed unit row; a file whose units all failed,
or that failed itself, is a failed file row.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.core.io.maps import ENCODING, save_map
from loupe.core.models import WeightSpec
from loupe.core.models.heads import aggregate_scores, model_outputs, to_scores
from loupe.core.units import UnitInfo
from loupe.workflows.scoring import artifacts as art
from loupe.workflows.scoring.produce import FileRecord, Packet
from loupe.workflows.scoring.table import decision_column, score_column

DEFAULT_THRESHOLD = 0.5


def thresholds_for(spec: WeightSpec) -> tuple[dict[str, float], str, dict[str, float]]:
    """(file thresholds per label, where they came from — ``stored`` / ``default 0.5`` / ``mixed`` —, unit
    thresholds per label: the spec's ``unit_thresholds``, else the file thresholds)."""
    stored = {k: float(v) for k, v in spec.thresholds.items()}
    out = {lb: stored.get(lb, DEFAULT_THRESHOLD) for lb in spec.label_names}
    n = len(stored)
    source = "stored" if n == len(out) else f"default {DEFAULT_THRESHOLD}" if n == 0 else "mixed"
    units = {lb: float(spec.unit_thresholds.get(lb, out[lb])) for lb in spec.label_names}
    return out, source, units


@dataclass
class UnitOutputs:
    """A packet's model results for its ok units, in order (CPU)."""

    scores: torch.Tensor  # [n, K] float64
    embeddings: torch.Tensor | None = None  # [n, D], kept only for attention aggregation
    masks: np.ndarray | None = None  # [n, H, W] probabilities
    cams: tuple[np.ndarray, list[int]] | None = None  # Grad-CAM maps [n, H, W] and the label index of each
    images: torch.Tensor | None = None  # the inputs, kept only to draw explanation pictures
    infer_ms: float = 0.0  # per unit


class Scorer:
    """Runs the model on stacked unit images ``[n, C, H, W]``."""

    def __init__(self, model: torch.nn.Module, spec: WeightSpec, device: torch.device | str = "cpu", explainer=None):
        self.model = model.to(device).eval()
        self.spec = spec
        self.device = torch.device(device)
        self.explainer = explainer
        self.keep_embeddings = spec.aggregation == "attention"

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in model_outputs(self.model, images.to(self.device, non_blocking=True)).items()}

    def __call__(self, images: torch.Tensor) -> UnitOutputs:
        t0 = time.perf_counter()
        out = self._forward(images)
        scores = to_scores(out["logits"], self.spec.task).double()  # [n, K]
        res = UnitOutputs(scores, infer_ms=(time.perf_counter() - t0) * 1000.0 / images.shape[0])
        if self.keep_embeddings:
            res.embeddings = out["embedding"].float()
        if "mask" in self.spec.outputs and "mask_logits" in out:
            res.masks = torch.sigmoid(out["mask_logits"].float())[:, 0].numpy()  # [n, H, W]
        if self.explainer is not None:
            res.cams = self.explainer(images, scores)
            res.images = images
        return res


@dataclass
class _Acc:
    """One file's unit results while its units arrive."""

    content_id: str | None
    frame: dict[str, Any] | None
    infos: list[UnitInfo] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)
    embeddings: list[torch.Tensor] = field(default_factory=list)
    artifacts: list[list[dict[str, Any]]] = field(default_factory=list)
    explain: list[str | None] = field(default_factory=list)
    canvas: art.MaskCanvas | None = None
    cams: list[tuple] = field(default_factory=list)  # a min-heap of the top units' Grad-CAM, written at the end
    infer_ms: float = 0.0


class Assembler:
    """Unit results → file rows (and unit rows); see the module docstring.

    ``provenance``: the columns every file row repeats (domain, model, weights, preprocessing). ``table_dir``: the
    folder of the predictions table, that artifact paths are relative to; ``artifacts_dir`` None stores none.
    """

    def __init__(
        self,
        spec: WeightSpec,
        provenance: dict[str, str],
        *,
        model: torch.nn.Module | None = None,
        table_dir: Path | None = None,
        artifacts_dir: Path | None = None,
        keep_units: bool = False,
        explainer=None,
    ):
        self.spec, self.base, self.model = spec, dict(provenance), model
        self.labels = tuple(spec.label_names)
        self.thresholds, self.threshold_source, self.unit_thresholds = thresholds_for(spec)
        self.thresholds_json = json.dumps(self.thresholds, sort_keys=True)
        self.table_dir, self.artifacts_dir = table_dir, artifacts_dir
        self.keep_units, self.explainer = keep_units, explainer
        self.top_units = 8
        self._open: dict[str, _Acc] = {}

    def add(self, packet: Packet, out: UnitOutputs | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Take a packet and its model outputs; return the rows of the files that ended in it."""
        for path, start in packet.starts.items():
            self._open[path] = _Acc(start["content_id"], start["frame"])
        k = 0
        for rec in packet.units:
            acc = self._open[rec.file]
            acc.infos.append(rec.info)
            acc.statuses.append(rec.status)
            if rec.status != "ok":
                acc.scores.append(None)
                acc.artifacts.append([])
                acc.explain.append(None)
                continue
            self._unit_result(acc, rec.info, out, k)
            k += 1
        now = dt.datetime.now(dt.UTC)
        files, units = [], []
        for rec in packet.files:
            if rec.skipped:
                continue
            acc = self._open.pop(rec.path, None)
            row, unit_rows = self._file(rec, acc, now)
            files.append(row)
            units += unit_rows
        return files, units

    def discard(self, path: str) -> None:
        """Forget the units of ``path`` received so far (its reader died; its row is written as failed)."""
        self._open.pop(path, None)

    # ----------------------------------------------------------------------------------------------- units
    def _unit_result(self, acc: _Acc, info: UnitInfo, out: UnitOutputs, k: int) -> None:
        acc.scores.append(out.scores[k])
        acc.infer_ms += out.infer_ms
        if out.embeddings is not None:
            acc.embeddings.append(out.embeddings[k])
        refs: list[dict[str, Any]] = []
        if out.masks is not None and acc.frame and info.region is not None:
            if acc.canvas is None:
                acc.canvas = art.MaskCanvas(acc.frame["width"], acc.frame["height"])
            acc.canvas.add(out.masks[k], info.region)
        if out.cams is not None and self.artifacts_dir is not None:
            # Grad-CAM of a file's `top_units` highest-scoring units only: a slide's thousands of tiles would
            # each get two PNGs; the maps wait (bounded) until the file ends
            maps, top = out.cams
            entry = (float(out.scores[k].max()), len(acc.infos), info, maps[k], int(top[k]),
                     self.explainer.display(out.images[k]))  # fmt: skip
            heap = acc.cams
            (heapq.heappush if len(heap) < self.top_units else heapq.heappushpop)(heap, entry)
        acc.artifacts.append(refs)
        acc.explain.append(None)

    def _write_cams(self, acc: _Acc) -> None:
        """The kept Grad-CAM maps, written and referenced from their units (the picture of a one-unit file is its
        ``explain_path``)."""
        for _, position, info, cam, top, display in acc.cams:
            ref = self._gradcam(acc, info, cam, top, display)
            acc.artifacts[position - 1].append(ref)
            acc.explain[position - 1] = ref["picture"]
        acc.cams.clear()

    def _gradcam(self, acc: _Acc, info: UnitInfo, cam: np.ndarray, top: int, display: np.ndarray) -> dict[str, Any]:
        label = self.labels[top]
        stem = f"{art.file_key(acc.content_id)}-u{info.index}-{art.safe_label(label)}"
        data, picture = self.artifacts_dir / f"{stem}-gradcam.png", self.artifacts_dir / f"{stem}.png"
        save_map(cam, data)
        art.overlay_picture(display, cam, picture)
        region = list(info.region) if info.region is not None else None
        return {
            "kind": "gradcam",
            "method": "Grad-CAM, element-wise (ReLU(grad x activation)), last block's first norm",
            "path": self._rel(data),
            "picture": self._rel(picture),
            "encoding": ENCODING,
            "label": label,
            "unit": info.index,
            "frame": {"space": "region", "region": region},
        }

    def _rel(self, p: Path) -> str:
        return p.relative_to(self.table_dir).as_posix() if self.table_dir else str(p)

    # ----------------------------------------------------------------------------------------------- files
    def _file(self, rec: FileRecord, acc: _Acc | None, now: dt.datetime) -> tuple[dict[str, Any], list[dict]]:
        row = self._base_row(rec, now)
        if rec.status != "ok" or acc is None:
            return row, []
        ok = [s for s in acc.scores if s is not None]
        failed = sum(st.startswith("failed") for st in acc.statuses)
        row["n_units"], row["n_units_failed"] = len(acc.statuses), failed
        refs = self._file_artifacts(rec, acc.content_id)
        if not ok:
            first = next(s for s in acc.statuses if s != "ok")
            row["status"] = (
                f"failed: no unit could be scored: {len(acc.statuses)} of {len(acc.statuses)} "
                f"{'failed or were excluded' if failed < len(acc.statuses) else 'failed'} (first: {first})"
            )
            row["units_summary"] = json.dumps(self._summary(acc, None, []))
            row["artifacts"] = json.dumps(refs) if refs else None
            return row, self._unit_rows(rec, acc, None) if self.keep_units else []
        self._write_cams(acc)
        scores, attention = self._aggregate(torch.stack(ok), acc)
        self._fill(row, scores.tolist(), self.thresholds)
        row["infer_ms"] = acc.infer_ms
        refs += [r for rs in acc.artifacts for r in rs] if len(acc.infos) == 1 else []
        if acc.canvas is not None and self.artifacts_dir is not None:
            dst = self.artifacts_dir / f"{art.file_key(acc.content_id)}-mask.png"
            refs.insert(0, acc.canvas.save(dst, self._rel(dst), self.spec.mask_threshold))
        refs += self._heatmaps(acc, scores, attention)
        row["artifacts"] = json.dumps(refs) if refs else None
        row["explain_path"] = acc.explain[0] if len(acc.infos) == 1 else None
        row["units_summary"] = json.dumps(self._summary(acc, scores, attention))
        return row, self._unit_rows(rec, acc, attention) if self.keep_units else []

    def _heatmaps(self, acc: _Acc, scores: torch.Tensor, attention: list[float] | None) -> list[dict[str, Any]]:
        """Tiled files: the top label's tile scores (and the MIL attention, as a share of its peak) painted over the
        file's frame, as 16-bit maps — what a heatmap viewer or QuPath overlays on the slide."""
        placed = [(info.region, s) for info, s in zip(acc.infos, acc.scores, strict=True)
                  if s is not None and info.region is not None and info.kind == "tile"]  # fmt: skip
        if len(placed) < 2 or not acc.frame or self.artifacts_dir is None:
            return []
        top = int(torch.argmax(scores)) if self.spec.task == "multiclass" or len(self.labels) == 1 else 0
        key, w, h = art.file_key(acc.content_id), acc.frame["width"], acc.frame["height"]
        regions = [r for r, _ in placed]
        maps = [(f"scores:{self.labels[top]}", [float(s[top]) for _, s in placed], self.labels[top])]
        if attention is not None:
            peak = max(attention) or 1.0
            maps.append(("attention", [a / peak for a in attention], None))
        refs = []
        for name, values, label in maps:
            dst = self.artifacts_dir / f"{key}-heatmap-{art.safe_label(name)}.png"
            ref = art.grid_heatmap(w, h, regions, values).save(dst, self._rel(dst), 0.5)
            refs.append({**ref, "kind": "heatmap", "name": name, "label": label})
        return refs

    def _summary(self, acc: _Acc, scores: torch.Tensor | None, attention: list[float] | None) -> dict[str, Any]:
        """Counts by status (``excluded`` ones by reason) and the top units for the file's top label (or, with
        attention, the most attended ones): what a slide's row tells about its tiles without the unit table."""
        excluded: dict[str, int] = {}
        for st in acc.statuses:
            if st.startswith("excluded"):
                reason = st.removeprefix("excluded: ").split(" (")[0]
                excluded[reason] = excluded.get(reason, 0) + 1
        failed = sum(st.startswith("failed") for st in acc.statuses)
        out: dict[str, Any] = {"ok": sum(st == "ok" for st in acc.statuses), "failed": failed, "excluded": excluded}
        if scores is None:
            return out
        top = int(torch.argmax(scores)) if self.spec.task == "multiclass" or len(self.labels) == 1 else 0
        label = self.labels[top]
        ranked, k = [], 0
        for info, s in zip(acc.infos, acc.scores, strict=True):
            if s is None:
                continue
            weight = attention[k] if attention is not None else None
            ranked.append({"unit": info.index, "region": list(info.region) if info.region else None,
                           "score": float(s[top]), "attention": weight})  # fmt: skip
            k += 1
        key = "attention" if attention is not None else "score"
        out |= {"top_label": label, "ranked_by": key,
                "top": sorted(ranked, key=lambda r: -(r[key] or 0.0))[: self.top_units]}  # fmt: skip
        return out

    def _file_artifacts(self, rec: FileRecord, content_id: str | None) -> list[dict[str, Any]]:
        """Write what the reader made for the file (thumbnail, tissue mask, outlines) and reference it."""
        if self.artifacts_dir is None or not rec.artifacts:
            return []
        refs = []
        for a in rec.artifacts:
            dst = self.artifacts_dir / f"{art.file_key(content_id)}-{a.kind}{a.suffix}"
            art.save_file_artifact(a, dst)
            refs.append({"kind": a.kind, "path": self._rel(dst), "frame": a.frame,
                         "encoding": art.encoding_of(a)})  # fmt: skip
        return refs

    def _aggregate(self, scores: torch.Tensor, acc: _Acc) -> tuple[torch.Tensor, list[float] | None]:
        """File scores ``[K]`` from unit scores ``[N, K]`` (and the attention over ok units, for MIL)."""
        if self.spec.aggregation != "attention":
            return aggregate_scores(scores, self.spec.aggregation), None
        with torch.inference_mode():
            emb = torch.stack(acc.embeddings).to(next(self.model.parameters()).device)
            out = self.model.aggregate_units(emb)
        return to_scores(out["logits"].cpu(), self.spec.task).double(), out["attention"].cpu().double().tolist()

    def _fill(self, row: dict[str, Any], scores: list[float], thresholds: dict[str, float]) -> None:
        decisions = [bool(s >= thresholds[lb]) for lb, s in zip(self.labels, scores, strict=True)]
        row["scores"] = list(zip(self.labels, scores, strict=True))
        row["decisions"] = list(zip(self.labels, decisions, strict=True))
        for lb, s, d in zip(self.labels, scores, decisions, strict=True):
            row[score_column(lb)], row[decision_column(lb)] = s, d
        if self.spec.task == "multiclass":
            row["predicted_label"] = self.labels[max(range(len(scores)), key=scores.__getitem__)]

    def _base_row(self, rec: FileRecord, now: dt.datetime) -> dict[str, Any]:
        return {
            **self.base,
            "aggregation": self.spec.aggregation,
            "path": rec.path,
            "content_id": rec.content_id,
            "content_sha256": rec.content_sha256,
            "status": rec.status,
            "thresholds": self.thresholds_json,
            "threshold_source": self.threshold_source,
            "n_units": rec.n_units,
            "meta": rec.meta_json,
            "frame": json.dumps(rec.frame) if rec.frame else None,
            "read_ms": rec.read_ms,
            "scored_at": now,
        }

    def _unit_rows(self, rec: FileRecord, acc: _Acc, attention: list[float] | None) -> list[dict[str, Any]]:
        rows, k = [], 0
        for info, status, scores, refs in zip(acc.infos, acc.statuses, acc.scores, acc.artifacts, strict=True):
            row = {"path": rec.path, "content_id": rec.content_id, "unit": info.index, "kind": info.kind,
                   "level": info.level, "frame_index": info.frame_index, "time_s": info.time_s, "status": status,
                   "meta": json.dumps(info.meta, sort_keys=True, default=str) if info.meta else None,
                   "artifacts": json.dumps(refs) if refs else None}  # fmt: skip
            if info.region is not None:
                row["x"], row["y"], row["width"], row["height"] = info.region
            if info.box is not None:
                row["box_x"], row["box_y"], row["box_width"], row["box_height"] = info.box
            if scores is not None:
                self._fill(row, scores.tolist(), self.unit_thresholds)
                row.pop("predicted_label", None)
                if attention is not None:
                    row["attention"] = attention[k]
                k += 1
            rows.append(row)
        return rows
