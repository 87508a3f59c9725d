"""Overlays land where their coordinate frame says, at any display size."""

from __future__ import annotations

import numpy as np

from loupe.apps.render import View, compose, place, zoom
from loupe.core.review import Layer, Overlay

LAYER = Layer("film", "film", "x.png", {"width": 400, "height": 200}, window=(0.5, 1.0))


def test_a_region_overlay_lands_on_its_region_at_display_scale() -> None:
    ov = Overlay("cam", "heatmap", {"space": "region", "region": [200, 100, 200, 100]}, "m.png")
    values, covered = place(ov, np.ones((8, 8), np.float32), LAYER.frame, (100, 200))  # display at half size
    assert covered[50:, 100:].all() and not covered[:50].any() and not covered[:, :100].any()
    assert values[75, 150] == 1.0


def test_a_file_space_mask_shows_only_above_its_threshold() -> None:
    base = np.full((100, 200), 0.5, np.float32)
    mask = np.zeros((50, 100), np.float32)
    mask[:, 50:] = 0.9  # the right half is "tampered"
    ov = Overlay("mask", "mask", {"space": "file", "scale": 0.25}, "m.png", colormap="reds", threshold=0.5)
    img = compose(base, LAYER, [(ov, mask)], View(window=(0.5, 1.0), overlays=("mask",), opacity=1.0))
    assert img.shape == (100, 200, 3)
    left, right = img[:, :90].reshape(-1, 3), img[:, 110:].reshape(-1, 3)
    assert (left == left[0]).all() and left[0][0] == left[0][1] == left[0][2]  # untouched grey
    assert right[:, 0].mean() > right[:, 2].mean() + 50  # red where the mask is above threshold
    hidden = compose(base, LAYER, [(ov, mask)], View(window=(0.5, 1.0), overlays=(), opacity=1.0))
    assert (hidden == hidden[0, 0]).all()  # overlays toggle off


def test_window_level_and_zoom() -> None:
    base = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (100, 1))
    narrow = compose(base, LAYER, [], View(window=(0.5, 0.2)))
    assert narrow[0, 10, 0] == 0 and narrow[0, 190, 0] == 255 and 0 < narrow[0, 100, 0] < 255
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, 2)
    z = zoom(img, 2.0, (0.0, 0.0))  # the top-left quarter, enlarged
    assert z.shape == img.shape and z[0, 0, 0] == 0 and z[3, 3, 0] == img[1, 1, 0]


def test_grid_cells_are_coloured_by_their_value() -> None:
    base = np.zeros((100, 200), np.float32)
    cells = ({"region": [0, 0, 200, 200], "value": 1.0}, {"region": [200, 0, 200, 200], "value": 0.0})
    ov = Overlay("units", "grid", {"space": "cells"}, cells=cells, colormap="inferno")
    img = compose(base, LAYER, [(ov, None)], View(overlays=("units",), opacity=1.0)).astype(int)
    assert img[50, 50].sum() > img[50, 150].sum() + 200  # the high cell is bright, the low one dark
