"""The forensics part of `loupe demo`: inputs from scikit-image (one copy-moved on purpose, a clip with a face,
a truncated clip) and a demo detector whose spec says what it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from loupe.core.models import WeightSpec
from loupe.domains.forensics import demo
from loupe.domains.forensics.faces import detect_faces
from loupe.domains.forensics.video import probe, read_frames


def test_the_copy_move_forgery_repeats_a_block_elsewhere() -> None:
    a = np.random.default_rng(0).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    b = copy_moved = demo.copy_move(a, size=32)
    changed = np.argwhere((b != a).any(-1))
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert (y1 - y0 + 1, x1 - x0 + 1) == (32, 32)  # only the pasted block changed
    np.testing.assert_array_equal(copy_moved[y0 : y1 + 1, x0 : x1 + 1], a[64:96, 80:112])


def test_demo_inputs_and_the_clip_shows_a_face(tmp_path: Path) -> None:
    folder = demo.demo_inputs(tmp_path / "in")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["SOURCES.txt", "astronaut.png", "coffee.png", "astronaut_copy_move.png", demo.CLIP_NAME, demo.CORRUPT_NAME]
    )
    info = probe(folder / demo.CLIP_NAME)
    assert info.frame_count == 20 and info.fps == 10
    frames = dict(read_frames(folder / demo.CLIP_NAME, [0, 19]))
    assert all(isinstance(f, np.ndarray) and detect_faces(f) for f in frames.values())  # the astronaut's face
    assert (folder / demo.CORRUPT_NAME).stat().st_size == 4096
    assert Image.open(folder / "astronaut.png").size == (512, 512)


def test_demo_model_says_it_is_a_demo_and_stores_its_threshold(tmp_path: Path) -> None:
    logged: dict[str, float] = {}

    class Recorder:
        def log_metrics(self, m: dict[str, float], step: int | None = None) -> None:
            logged.update(m)

        def log_params(self, p: dict) -> None:
            logged.update(p)

    spec = WeightSpec.load(demo.demo_model(tmp_path / "m", run=Recorder(), fast=True) / "weight_spec.json")
    assert spec.description.startswith("DEMO MODEL") and spec.label_names == ("Fake",)
    assert spec.resize_mode == "center_crop" and "Fake" in spec.thresholds
    assert logged["val_auroc"] > 0.6, logged  # it learnt something in its few seconds
