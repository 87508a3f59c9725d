"""The slide review case: the thumbnail as base layer, the tissue mask, the tile-score grid (and attention, for MIL
models) as heatmaps, the top tiles to look at closely, and the slide's findings."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from loupe.core.review import CaseContext, Layer, Overlay, ReviewCase, default_case


def slide_case(row: dict[str, Any], units: list[dict[str, Any]], ctx: CaseContext) -> ReviewCase:
    case = default_case(row, units, ctx, "pathology")
    refs = {r["kind"]: r for r in json.loads(row.get("artifacts") or "[]")}
    layers = case.layers
    if "thumbnail" in refs:  # the stored thumbnail: the slide itself is gigapixels
        thumb = refs["thumbnail"]
        layers = (Layer("slide", "slide", str(ctx.artifact(thumb["path"])), case.layers[0].frame),)
    overlays = list(case.overlays)
    if "tissue_mask" in refs:
        m = refs["tissue_mask"]
        overlays.insert(0, Overlay("tissue mask", "mask", m["frame"], str(ctx.artifact(m["path"])), opacity=0.3,
                                   colormap="Greens", threshold=0.5, visible=False))  # fmt: skip
    placed = [u for u in units if u.get("attention") is not None and u.get("x") is not None]
    if placed:
        top = max(u["attention"] for u in placed) or 1.0
        cells = tuple({"region": [u["x"], u["y"], u["width"], u["height"]], "value": u["attention"] / top,
                       "label": "attention", "unit": u["unit"]} for u in placed)  # fmt: skip
        overlays.insert(0, Overlay("attention (MIL)", "grid", {"space": "cells"}, cells=cells))
        overlays = [dataclasses.replace(o, visible=False) if o.name.startswith("units:") else o for o in overlays]
    summary = json.loads(row.get("units_summary") or "{}")
    meta = dict(case.metadata)
    if summary:
        meta["tiles"] = {"scored": summary.get("ok"), "failed": summary.get("failed"),
                         "left out by QC": summary.get("excluded")}  # fmt: skip
    highlights = tuple(
        {"unit": t["unit"], "region": t["region"], "score": t["score"], "attention": t.get("attention"),
         "label": summary.get("top_label")}
        for t in summary.get("top", []) if t.get("region")
    )  # fmt: skip
    source = str(ctx.source(row["path"]))
    return dataclasses.replace(case, layers=layers, overlays=tuple(overlays), metadata=meta, source=source,
                               highlights=highlights)  # fmt: skip
