"""The forensics review case: a picture with its mask and face boxes, or a clip's representative frame with the
faces found in it, a per-frame timeline of face scores, and the highest-scoring faces to look at closely.

A picture's case is `loupe.core.review.default_case` (the picture as base layer; a ``mask`` artifact becomes the
mask overlay; face units become boxes and a score grid over their crops). A clip cannot be drawn as one picture:
its base layer is the stored ``thumbnail`` (a sampled frame, the one with the largest face), its overlays are the
units of that frame only, and its ``timeline`` has one point per sampled frame (the highest face score of the
frame's top label; excluded and failed frames are points without a score, with their status).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from loupe.core.review import CaseContext, Layer, ReviewCase, artifact_overlays, default_case, unit_overlays

#: Faces offered as highlights (the highest-scoring ones).
TOP_FACES = 8


def forensics_case(row: dict[str, Any], units: list[dict[str, Any]], ctx: CaseContext) -> ReviewCase:
    case = default_case(row, units, ctx, "forensics")
    refs = {r["kind"]: r for r in json.loads(row.get("artifacts") or "[]")}
    label = _top_label(row, units)
    meta = dict(case.metadata)
    summary = json.loads(row.get("units_summary") or "{}")
    if summary:
        meta["units"] = {"scored": summary.get("ok"), "failed": summary.get("failed"),
                         "left out": summary.get("excluded")}  # fmt: skip
    highlights = _top_faces(units, label)
    if "thumbnail" not in refs:  # a picture: the default case draws it
        return dataclasses.replace(case, metadata=meta, highlights=highlights)
    thumb = refs["thumbnail"]
    shown = thumb["frame"].get("frame_index")
    layer = Layer(f"frame {shown}", "image", str(ctx.artifact(thumb["path"])), case.layers[0].frame,
                  frames=(shown,) if shown is not None else ())  # fmt: skip
    in_frame = [u for u in units if u.get("frame_index") == shown]
    meta["shown frame"] = {"frame_index": shown, "time_s": thumb["frame"].get("time_s")}
    return dataclasses.replace(case, layers=(layer,), overlays=artifact_overlays(row, ctx) + unit_overlays(in_frame),
                               metadata=meta, timeline=frame_timeline(units, label),
                               highlights=highlights)  # fmt: skip


def frame_timeline(units: list[dict[str, Any]], label: str | None) -> tuple[dict[str, Any], ...]:
    """One point per sampled frame, in time order: ``{"time_s", "frame_index", "label", "score"`` (the frame's
    highest face score for ``label``, None when no face scored) ``, "status"`` (``ok`` when a face scored, else the
    frame's own status) ``, "faces": [{"unit", "score", "box", "status"}]}``."""
    frames: dict[int, list[dict[str, Any]]] = {}
    for u in units:
        if u.get("frame_index") is not None:
            frames.setdefault(int(u["frame_index"]), []).append(u)
    out = []
    for fi in sorted(frames):
        us = frames[fi]
        faces = [{"unit": u["unit"], "score": _score(u, label), "status": u.get("status"),
                  "box": [u["box_x"], u["box_y"], u["box_width"], u["box_height"]]}
                 for u in us if u.get("kind") == "face" and u.get("box_x") is not None]  # fmt: skip
        scored = [s for u in us if (s := _score(u, label)) is not None]
        status = "ok" if scored else str(us[0].get("status"))
        out.append({"time_s": us[0].get("time_s"), "frame_index": fi, "label": label,
                    "score": max(scored) if scored else None, "status": status, "faces": faces})  # fmt: skip
    return tuple(out)


def _top_faces(units: list[dict[str, Any]], label: str | None) -> tuple[dict[str, Any], ...]:
    faces = [u for u in units if u.get("kind") == "face" and _score(u, label) is not None]
    faces.sort(key=lambda u: -_score(u, label))
    return tuple({"unit": u["unit"], "region": [u["x"], u["y"], u["width"], u["height"]], "score": _score(u, label),
                  "label": label, "frame_index": u.get("frame_index"), "time_s": u.get("time_s")}
                 for u in faces[:TOP_FACES])  # fmt: skip


def _top_label(row: dict[str, Any], units: list[dict[str, Any]]) -> str | None:
    """The file's highest-scoring label (a failed file: the first label its units were scored for)."""
    scores = dict(row.get("scores") or ())
    if scores:
        return max(scores, key=scores.get)
    for u in units:
        if u.get("scores"):
            return next(iter(dict(u["scores"])))
    return None


def _score(unit: dict[str, Any], label: str | None) -> float | None:
    v = dict(unit.get("scores") or ()).get(label) if label is not None else None
    return None if v is None else float(v)
