"""The chest X-ray review case: the film with window/level defaults, Grad-CAM over it, findings at the model's
stored thresholds, and the radiograph's non-identifying acquisition facts first in the metadata panel."""

from __future__ import annotations

import dataclasses
from typing import Any

from loupe.core.review import CaseContext, ReviewCase, default_case

#: Shown first, in this order, when present (the rest of the allowlisted metadata follows).
CLINICAL_KEYS = (
    "modality", "view_position", "presentation_intent", "body_part", "patient_sex", "patient_age",
    "photometric_interpretation", "inverted", "voi", "rescale", "pixel_spacing", "bit_depth", "original_size",
    "transfer_syntax_name",
)  # fmt: skip


def cxr_case(row: dict[str, Any], units: list[dict[str, Any]], ctx: CaseContext) -> ReviewCase:
    """A film layer (the readers already applied the file's own VOI window, so the default window shows the film
    as the modality meant it: centre 0.5, width 1 on display intensities) and the default overlays and findings."""
    case = default_case(row, units, ctx, "cxr")
    film = dataclasses.replace(case.layers[0], name="film", kind="film", window=(0.5, 1.0))
    meta = {k: case.metadata[k] for k in CLINICAL_KEYS if k in case.metadata}
    meta |= {k: v for k, v in case.metadata.items() if k not in meta}
    return dataclasses.replace(case, layers=(film,), metadata=meta)
