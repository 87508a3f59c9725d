"""Pathology domain: whole-slide images tiled at a physical size with tissue and quality control, tile and slide
scores (top-k pooling or attention MIL), heatmaps over the slide, pathology CLIP zero- and few-shot."""

from __future__ import annotations

from loupe.core.domain import DomainInfo, register_domain
from loupe.core.io.slides import SAFE_META_KEYS, SLIDE_SUFFIXES
from loupe.domains.pathology import demo, models  # noqa: F401 - models registers the tile ViTs and the preset
from loupe.domains.pathology.review import slide_case
from loupe.domains.pathology.tiles import slide_units

register_domain(
    DomainInfo(
        name="pathology",
        description="Whole-slide images: tiles, slide scores, attention heatmaps, pathology CLIP zero/few-shot",
        read_units=slide_units,
        unit_table=True,
        meta_keys=tuple(
            SAFE_META_KEYS | {"mpp_um", "tile_um", "tile_px", "tissue_fraction", "tiles_in_grid", "tiles_on_tissue"}
        ),  # fmt: skip
        review_case=slide_case,
        input_suffixes=tuple(SLIDE_SUFFIXES),
        demo_inputs=demo.demo_inputs,
        demo_model=demo.demo_model,
    )
)

# recipes register themselves on import
from loupe.domains.pathology import clip, fewshot, mil, train  # noqa: E402, F401
