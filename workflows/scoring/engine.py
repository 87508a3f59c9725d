"""The scoring path shared by both backends: read one input (in a worker), score a batch, build the rows.

`load_item` runs where the data is read (DataLoader worker or Ray actor) and never raises for a bad file: the
failure becomes the item's status. `BatchScorer` runs the model on the readable items of a batch and turns every
item, readable or not, into exactly one predictions row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loupe.core.errors import LoupeError
from loupe.core.models import Classifier, WeightSpec
from loupe.workflows.scoring.model import Provenance
from loupe.workflows.scoring.table import decision_column, score_column

DEFAULT_THRESHOLD = 0.5
#: Reader metadata keys that could identify a patient or a study; they never reach the table, logs or MLflow.
_IDENTIFYING = re.compile(r"uid|patient_(id|name)|name_of|birth|accession|institution|physician|operator|date|^path$")


@dataclass
class Item:
    """One input after reading: its model tensor ``[C, H, W]`` (None when unreadable or already scored)."""

    path: str
    sha256: str | None
    image: torch.Tensor | None
    status: str
    meta_json: str | None
    read_ms: float
    skipped: bool = False


def content_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_meta(meta: dict[str, Any]) -> str:
    """The reader's metadata minus anything identifying, as compact JSON (non-JSON values as strings)."""
    kept = {k: v for k, v in meta.items() if not _IDENTIFYING.search(k.lower())}
    return json.dumps(kept, sort_keys=True, default=str, separators=(",", ":"))


def failure_reason(exc: BaseException, path: str = "") -> str:
    """One line for the ``status`` column: a LoupeError's own message (minus the path the row already has), else
    the exception type and message."""
    msg = str(exc) if isinstance(exc, LoupeError) else f"{type(exc).__name__}: {exc}"
    msg = msg.removeprefix(f"{path}: ") if path else msg
    return " ".join(msg.split())[:500]


def load_item(
    path: str,
    loader: Callable[[Path, WeightSpec], tuple[torch.Tensor, dict[str, Any]]],
    spec: WeightSpec,
    done: frozenset[str] | set[str] = frozenset(),
) -> Item:
    """Hash, then (unless already scored) read and preprocess ``path``; failures become ``failed: reason``."""
    t0 = time.perf_counter()
    sha = None
    try:
        sha = content_sha256(path)
        if f"{path}\0{sha}" in done:
            return Item(path, sha, None, "ok", None, 0.0, skipped=True)
        image, meta = loader(Path(path), spec)
        expected = tuple(spec.input_size)
        if tuple(image.shape) != expected:
            raise LoupeError(f"preprocessing produced shape {tuple(image.shape)}, the model expects {expected}")
        return Item(path, sha, image.float().contiguous(), "ok", safe_meta(meta), _ms(t0))
    except Exception as exc:  # noqa: BLE001 - a bad input is a row, never the end of the batch
        return Item(path, sha, None, f"failed: {failure_reason(exc, path)}", None, _ms(t0))


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def collate_items(items: list[Item]) -> tuple[list[Item], torch.Tensor | None]:
    """Keep every item (failed ones too) and stack the readable images  # [B_ok, C, H, W]."""
    images = [it.image for it in items if it.image is not None]
    stacked = torch.stack(images) if images else None
    for it in items:
        it.image = None  # the stacked tensor carries them; don't ship each twice between processes
    return items, stacked


def to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Logits ``[B, K]`` → probabilities: softmax for multiclass, sigmoid for multilabel / binary."""
    logits = logits.float()
    return logits.softmax(-1) if task == "multiclass" else logits.sigmoid()


def thresholds_for(spec: WeightSpec) -> tuple[dict[str, float], str]:
    """Per-label operating thresholds and where they came from (``stored`` / ``default 0.5`` / ``mixed``)."""
    stored = {k: float(v) for k, v in spec.thresholds.items()}
    out = {lb: stored.get(lb, DEFAULT_THRESHOLD) for lb in spec.label_names}
    n = len(stored)
    source = "stored" if n == len(out) else f"default {DEFAULT_THRESHOLD}" if n == 0 else "mixed"
    return out, source


class BatchScorer:
    """Runs the model on a collated batch and returns one row per item (the skipped ones excepted)."""

    def __init__(
        self,
        model: Classifier,
        spec: WeightSpec,
        provenance: Provenance,
        device: torch.device | str = "cpu",
        explainer: Any = None,
    ):
        self.model = model.to(device).eval()
        self.spec = spec
        self.device = torch.device(device)
        self.base = provenance.to_dict()
        self.thresholds, self.threshold_source = thresholds_for(spec)
        self.thresholds_json = json.dumps(self.thresholds, sort_keys=True)
        self.explainer = explainer

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        return to_scores(self.model(images.to(self.device, non_blocking=True)), self.spec.task).cpu()  # [B, K]

    def __call__(self, items: list[Item], images: torch.Tensor | None) -> list[dict[str, Any]]:
        scores, infer_ms = None, 0.0
        if images is not None:
            t0 = time.perf_counter()
            scores = self._forward(images).double()
            infer_ms = _ms(t0) / images.shape[0]
        maps = (
            self.explainer(images, scores, [it for it in items if it.status == "ok" and not it.skipped])
            if (self.explainer is not None and images is not None)
            else None
        )
        now = dt.datetime.now(dt.UTC)
        rows, k = [], 0
        for it in items:
            if it.skipped:
                continue
            row = self._row(it, now)
            if it.status == "ok":
                self._fill_scores(row, scores[k].tolist())
                row["infer_ms"] = infer_ms
                row["explain_path"] = maps[k] if maps else None
                k += 1
            rows.append(row)
        return rows

    def _row(self, it: Item, now: dt.datetime) -> dict[str, Any]:
        return {
            **self.base,
            "path": it.path,
            "content_sha256": it.sha256,
            "status": it.status,
            "thresholds": self.thresholds_json,
            "threshold_source": self.threshold_source,
            "meta": it.meta_json,
            "read_ms": it.read_ms,
            "scored_at": now,
        }

    def _fill_scores(self, row: dict[str, Any], scores: list[float]) -> None:
        labels = self.spec.label_names
        for lb, s in zip(labels, scores, strict=True):
            row[score_column(lb)] = s
            row[decision_column(lb)] = bool(s >= self.thresholds[lb])
        if self.spec.task == "multiclass":
            row["predicted_label"] = labels[max(range(len(scores)), key=scores.__getitem__)]
