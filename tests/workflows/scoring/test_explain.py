"""Grad-CAM points at what the model looks at: trained to find a bright square, the map lights up the square."""

from __future__ import annotations

import pytest
import torch

from loupe.core.models import WeightSpec, build_model
from loupe.workflows.scoring.explain import ViTGradCAM

SIDE, PATCH = 32, 8


def _batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise films; half carry an 8x8 bright square on a random patch of the 4x4 grid. Returns x, y, square corner."""
    x = torch.rand(n, 1, SIDE, SIDE, generator=g) * 0.4
    y = (torch.arange(n) % 2).float()
    corners = torch.randint(0, SIDE // PATCH, (n, 2), generator=g) * PATCH
    for i in range(n):
        if y[i]:
            r, c = corners[i].tolist()
            x[i, :, r : r + PATCH, c : c + PATCH] = 0.9
    return (x - 0.5) / 0.25, y, corners


@pytest.mark.parametrize("seed", [0, 1])  # classic channel-mean Grad-CAM missed the square with seed 0
def test_grad_cam_localises_a_planted_square(seed: int) -> None:
    torch.manual_seed(seed)
    spec = WeightSpec(name="blob", architecture="vit_micro_patch8", input_size=(1, SIDE, SIDE), mean=(0.5,),
                      std=(0.25,), label_names=("square",), task="binary")  # fmt: skip
    model, _ = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(150):
        x, y, _ = _batch(64, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, corners = _batch(32, g)
    x, corners = x[y == 1], corners[y == 1]
    with torch.inference_mode():
        scores = torch.sigmoid(model(x))
    assert scores.mean() > 0.9, "the model did not learn the square; the test cannot judge Grad-CAM"
    maps, top = ViTGradCAM(model, spec)(x, scores)
    assert maps.shape == (len(x), SIDE, SIDE) and top == [0] * len(x)
    inside = []
    for m, (r, c) in zip(maps, corners.tolist(), strict=True):
        square = m[r : r + PATCH, c : c + PATCH].mean()
        rest = (m.sum() - m[r : r + PATCH, c : c + PATCH].sum()) / (SIDE * SIDE - PATCH * PATCH)
        inside.append(square > 2 * rest)
    assert sum(inside) >= 0.8 * len(inside), f"the map points at the square in {sum(inside)} of {len(inside)} films"
