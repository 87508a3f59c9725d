"""Tissue masks and tile QC agree with histolab's labelled fixtures: tissue / no tissue / pen marks, and blur."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe.domains.pathology.tissue import mask_geojson, pen_mask, tile_qc, tissue_mask

pytestmark = pytest.mark.realdata


def _fixtures(shared_data: Path) -> Path:
    return shared_data / "pathology" / "histolab" / "tests" / "fixtures"


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_tiles_named_tissue_are_kept(shared_data: Path) -> None:
    tiles = sorted(_fixtures(shared_data).glob("tiles/tissue-level*.png"))
    assert len(tiles) == 6
    for t in tiles:
        qc = tile_qc(_rgb(t))
        assert qc.excluded is None, (t.name, qc)
        assert tissue_mask(_rgb(t)).mean() > 0.3, t.name


@pytest.mark.parametrize("name", ["no-tissue.png", "no-tissue2.png", "almost-white-1.png", "almost-white-2.png",
                                  "no-tissue-line.png"])  # fmt: skip
def test_tiles_named_no_tissue_are_background(shared_data: Path, name: str) -> None:
    rgb = _rgb(_fixtures(shared_data) / "tiles" / name)
    qc = tile_qc(rgb)
    assert qc.excluded is not None and qc.excluded.startswith("background") and qc.tissue < 0.2
    assert tissue_mask(rgb).mean() < 0.1


@pytest.mark.parametrize("name", ["tiles/no-tissue-red-pen.png", "tiles/no-tissue-green-pen.png",
                                  "tiles/high-nuclei-score-red-pen-level1.png",
                                  "tiles/very-low-nuclei-score-red-pen-level1.png",
                                  "tiles/medium-nuclei-score-green-pen-level1.png", "pil-images-rgb/tcga-red-pen.png",
                                  "pil-images-rgb/tcga-green-pen.png"])  # fmt: skip
def test_pen_fixtures_are_rejected_by_qc(shared_data: Path, name: str) -> None:
    qc = tile_qc(_rgb(_fixtures(shared_data) / name))
    assert qc.excluded is not None and qc.excluded.startswith("ink"), qc


def test_the_slide_mask_leaves_out_the_blue_pen(shared_data: Path) -> None:
    rgb = _rgb(_fixtures(shared_data) / "pil-images-rgb" / "wsi-blue-pen.png")
    ink, mask = pen_mask(rgb), tissue_mask(rgb)
    assert ink.sum() > 100 and not (mask & ink).any()


def test_a_blurred_tile_is_rejected_and_its_sharp_original_kept(shared_data: Path) -> None:
    from skimage.filters import gaussian

    rgb = _rgb(_fixtures(shared_data) / "tiles" / "tissue-level0-7352-11762-7864-12274.png")
    assert tile_qc(rgb).excluded is None
    blurred = (gaussian(rgb, 3, channel_axis=-1) * 255).astype(np.uint8)
    assert tile_qc(blurred).excluded.startswith("blurred")


def test_geojson_outlines_are_closed_polygons_in_level0_pixels() -> None:
    mask = np.zeros((50, 80), bool)
    mask[10:30, 20:60] = True
    gj = json.loads(json.dumps(mask_geojson(mask, scale=0.1)))
    (feature,) = gj["features"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    assert (ring[0] == ring[-1]).all() and ring[:, 0].min() == pytest.approx(195, abs=6)
    assert ring[:, 0].max() == pytest.approx(595, abs=6) and ring[:, 1].max() == pytest.approx(295, abs=6)
