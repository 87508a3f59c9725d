"""Slides → tiles: a tissue mask on a low-resolution thumbnail, a grid of tiles at a physical size over it, each
tile read from the best pyramid level and checked (background, pen, blur) before the model sees it.

`tile_grid` is pure geometry (level-0 rectangles); `slide_units` is the domain's unit reader for ``loupe score``
(tiles stream lazily; tiles that fail quality control become ``excluded`` unit rows, so the heatmap shows what was
left out and why); `iter_tiles` gives the same tiles to feature extraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from loupe.core.errors import ConfigError, UnsupportedInputError
from loupe.core.io.slides import Slide, open_slide
from loupe.core.models.spec import WeightSpec
from loupe.core.units import FileArtifact, FileUnits, Unit, UnitFailure, UnitInfo
from loupe.domains.pathology.tissue import QCConfig, geojson_text, tile_qc, tissue_mask

Rect = tuple[int, int, int, int]  # x, y, width, height in level-0 pixels


@dataclass(frozen=True)
class TilingConfig:
    """``tile_mpp``: microns per pixel of the tiles the model sees (0.5 ≈ 20x); ``tile_px``: their side in pixels
    (default: the model's input); ``overlap``: fraction of a tile shared with its neighbour; ``mask_mpp``: resolution
    of the tissue mask; ``min_mask_tissue``: share of a tile's area the mask must call tissue for it to be read;
    ``slide_mpp``: the slide's own resolution when it states none (or states it wrong); ``max_tiles``: read at most
    this many tiles (evenly spread), 0 = all; ``qc``: the per-tile checks."""

    tile_mpp: float = 0.5
    tile_px: int = 0
    overlap: float = 0.0
    mask_mpp: float = 8.0
    min_mask_tissue: float = 0.25
    slide_mpp: float | None = None
    max_tiles: int = 0
    qc: QCConfig = field(default_factory=QCConfig)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> TilingConfig:
        """From unit options (``loupe score --option tile_mpp=0.25``, a spec's ``unit_options``); ``qc.*`` keys go
        to the QC rules. Unknown keys are refused with the known ones."""
        opts = dict(options or {})
        qc = {k.removeprefix("qc."): opts.pop(k) for k in list(opts) if k.startswith("qc.")}
        qc |= opts.pop("qc", None) or {}
        known = {f.name for f in fields(cls)} - {"qc"}
        qc_known = {f.name for f in fields(QCConfig)}
        bad = sorted(set(opts) - known) + sorted(f"qc.{k}" for k in set(qc) - qc_known)
        if bad:
            raise ConfigError(
                f"unknown pathology unit option(s) {bad}; known: {sorted(known)} and qc.{sorted(qc_known)}"
            )
        cfg = cls(**opts, qc=QCConfig(**qc))
        problems = cfg.qc.problems()
        if not 0.0 <= cfg.overlap < 0.9:
            problems.append(f"overlap must be in [0, 0.9), got {cfg.overlap}")
        if cfg.tile_mpp <= 0 or cfg.mask_mpp <= 0:
            problems.append("tile_mpp and mask_mpp must be > 0 (microns per pixel)")
        if problems:
            raise ConfigError(problems, source="pathology unit options")
        return cfg


def tile_grid(width: int, height: int, tile0: float, overlap: float) -> list[Rect]:
    """Full tiles of ``tile0`` level-0 pixels over a ``width`` x ``height`` slide, row by row, centred (the margin
    left over is split between the edges)."""
    size = int(round(tile0))
    if size < 1 or size > min(width, height):
        return []
    stride = max(1, int(round(tile0 * (1 - overlap))))
    nx, ny = (width - size) // stride + 1, (height - size) // stride + 1
    ox, oy = (width - ((nx - 1) * stride + size)) // 2, (height - ((ny - 1) * stride + size)) // 2
    return [(ox + i * stride, oy + j * stride, size, size) for j in range(ny) for i in range(nx)]


@dataclass
class SlidePlan:
    """A slide's tiles before any is read: the tissue mask (and the thumbnail it came from), its scale (mask pixel
    per level-0 pixel), the kept rectangles, and what the grid had."""

    thumbnail: np.ndarray
    mask: np.ndarray
    scale: float
    tiles: list[Rect]
    grid: int
    tile0: float
    slide_mpp: float


def plan(slide: Slide, cfg: TilingConfig, tile_px: int) -> SlidePlan:
    """The tissue mask and the tiles to read (those the mask calls tissue over ``min_mask_tissue`` of their area)."""
    mpp0 = slide.require_mpp()
    w0, h0 = slide.dimensions
    scale = min(1.0, mpp0 / cfg.mask_mpp)
    thumb = slide.thumbnail(max(16, int(round(max(w0, h0) * scale))))
    scale = thumb.shape[1] / w0
    mask = tissue_mask(thumb, cfg.qc)
    tile0 = tile_px * cfg.tile_mpp / mpp0
    grid = tile_grid(w0, h0, tile0, cfg.overlap)
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    kept = []
    for x, y, w, h in grid:
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = (
            max(x0 + 1, min(mask.shape[1], math.ceil((x + w) * scale))),
            max(y0 + 1, min(mask.shape[0], math.ceil((y + h) * scale))),
        )
        area = (x1 - x0) * (y1 - y0)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        if area and inside / area >= cfg.min_mask_tissue:
            kept.append((x, y, w, h))
    if cfg.max_tiles and len(kept) > cfg.max_tiles:
        step = len(kept) / cfg.max_tiles
        kept = [kept[int(i * step)] for i in range(cfg.max_tiles)]
    return SlidePlan(thumb, mask, scale, kept, len(grid), tile0, mpp0)


def read_tile(slide: Slide, rect: Rect, tile_px: int) -> np.ndarray:
    """One tile, RGB ``uint8 [tile_px, tile_px, 3]``: read at the coarsest level with enough pixels, then resized."""
    from PIL import Image

    x, y, w, h = rect
    level = slide.best_level(w / tile_px)
    d = slide.level_downsamples[level]
    region = slide.read_region((x, y), level, (max(1, round(w / d)), max(1, round(h / d))))
    if region.shape[:2] != (tile_px, tile_px):
        region = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), Image.Resampling.BOX))
    return region


def iter_tiles(
    slide: Slide, tiles: list[tuple[int, Rect]], tile_px: int, cfg: TilingConfig
) -> Iterator[tuple[UnitInfo, Any]]:
    """For ``(index, rect)`` tiles: (unit info, RGB tile) when kept, (unit info, reason) when quality control
    leaves the tile out."""
    for i, rect in tiles:
        info = UnitInfo(i, "tile", rect, level=0)
        tile = read_tile(slide, rect, tile_px)
        qc = tile_qc(tile, cfg.qc)
        info.meta = qc.meta()
        yield info, (qc.excluded if qc.excluded else tile)


def slide_units(path: Path, spec: WeightSpec, options: dict[str, Any] | None = None) -> FileUnits:
    """The pathology unit reader: tiles of the slide at the model's tile size, lazily, with the thumbnail, the
    tissue mask and its GeoJSON outlines as the file's artifacts."""
    from loupe.core.transforms import ModelInput

    cfg = TilingConfig.from_options(options)
    tile_px = cfg.tile_px or int(spec.input_size[1])
    slide = open_slide(path, mpp=cfg.slide_mpp)
    try:
        p = plan(slide, cfg, tile_px)
    except UnsupportedInputError as exc:
        slide.close()
        if slide.mpp is None:  # say how to give it here: `loupe score pathology ... --option slide_mpp=0.5`
            raise UnsupportedInputError(f"{exc}: pass it with --option slide_mpp=MICRONS") from None
        raise
    except BaseException:
        slide.close()
        raise
    meta = slide.meta()
    meta |= {"mpp_um": round(p.slide_mpp, 4), "tile_um": round(tile_px * cfg.tile_mpp, 2), "tile_px": tile_px,
             "tissue_fraction": round(float(p.mask.mean()), 4), "tiles_in_grid": p.grid, "tiles_on_tissue":
             len(p.tiles)}  # fmt: skip
    frame = {"space": "file", "scale": p.scale}
    w0, h0 = slide.dimensions
    # the reviewer's picture: up to 1024 px (the mask's thumbnail is at mask_mpp, 32 px for a 512 px field)
    thumb = p.thumbnail if max(p.thumbnail.shape[:2]) >= min(1024, max(w0, h0)) else slide.thumbnail(1024)
    artifacts = [FileArtifact("thumbnail", thumb, {"space": "file", "scale": thumb.shape[1] / w0}),
                 FileArtifact("tissue_mask", p.mask, frame),
                 FileArtifact("tissue", geojson_text(p.mask, p.scale), {"space": "file", "scale": 1.0},
                              ".geojson")]  # fmt: skip
    prep = ModelInput(spec)

    def units():
        try:
            for info, tile in iter_tiles(slide, list(enumerate(p.tiles)), tile_px, cfg):
                yield UnitFailure(tile, info, "excluded") if isinstance(tile, str) else Unit(prep(tile), info)
        finally:
            slide.close()

    return FileUnits(meta, {"width": w0, "height": h0}, units(), artifacts)
