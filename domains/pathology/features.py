"""Tile embeddings of whole slides, computed once and cached.

`embed_slide` tiles a slide exactly as scoring does (tissue mask, grid, QC), reads the tiles in region batches in
DataLoader worker processes (each worker opens the slide itself and reads its share), embeds them with any
Backbone / CLIP image tower in batches, and streams them into an HDF5 file (``features`` ``[N, D]`` float32,
``rects`` ``[N, 4]`` level-0 x, y, w, h, ``units`` ``[N]`` tile indices): memory stays at one batch whatever the
slide. The file is named by (slide content identity, model fingerprint, preprocessing and tiling), under
``<LOUPE_HOME>/features/``; asking again returns it without touching the model, across recipes and runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loupe.core.io.identity import content_identity
from loupe.core.io.slides import open_slide
from loupe.core.models.spec import WeightSpec
from loupe.core.paths import data_dir
from loupe.domains.pathology.tiles import TilingConfig, iter_tiles, plan

log = logging.getLogger(__name__)


def feature_cache_dir() -> Path:
    d = data_dir() / "features"
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes and bytes): two models with the same weights share caches."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class SlideFeatures:
    features: np.ndarray  # [N, D] float32
    rects: np.ndarray  # [N, 4] int64, level-0 x, y, w, h
    units: np.ndarray  # [N] tile index in the slide's grid of kept tiles
    path: Path  # the cache file
    from_cache: bool
    n_excluded: int = 0


class _TileStream(IterableDataset):
    def __init__(self, slide_path: Path, p, tile_px: int, cfg: TilingConfig, spec: WeightSpec):
        self.slide_path, self.p, self.tile_px, self.cfg, self.spec = slide_path, p, tile_px, cfg, spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from loupe.core.transforms import ModelInput

        info = get_worker_info()
        prep = ModelInput(self.spec)
        tiles = list(enumerate(self.p.tiles))
        share = tiles if info is None else tiles[info.id :: info.num_workers]  # each worker reads its share
        with open_slide(self.slide_path, mpp=self.cfg.slide_mpp) as slide:
            for unit, tile in iter_tiles(slide, share, self.tile_px, self.cfg):
                if isinstance(tile, str):
                    yield {"excluded": True, "unit": unit.index, "rect": unit.region}
                else:
                    yield {"excluded": False, "image": prep(tile), "unit": unit.index, "rect": unit.region}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [it for it in items if not it["excluded"]]
    return {"image": torch.stack([it["image"] for it in kept]) if kept else None,
            "unit": [it["unit"] for it in kept], "rect": [it["rect"] for it in kept],
            "excluded": len(items) - len(kept)}  # fmt: skip


def cache_key(identity: str, fingerprint: str, spec: WeightSpec, options: dict[str, Any]) -> str:
    blob = f"{identity}|{fingerprint}|{spec.preprocessing_hash(options)}".encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def embed_slide(
    path: str | Path,
    model: torch.nn.Module,
    spec: WeightSpec,
    options: dict[str, Any] | None = None,
    *,
    cache_dir: Path | None = None,
    fingerprint: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> SlideFeatures:
    """The tile embeddings of one slide (see the module docstring); ``model`` has ``embed(x) -> [B, D]``."""
    import h5py

    path = Path(path)
    opts = {**spec.unit_options, **(options or {})}
    fingerprint = fingerprint or model_fingerprint(model)
    key = cache_key(content_identity(path).id, fingerprint, spec, opts)
    cache = (cache_dir or feature_cache_dir()) / f"{key}.h5"
    if cache.is_file():
        return _load(cache, from_cache=True)
    cfg = TilingConfig.from_options(opts)
    tile_px = cfg.tile_px or int(spec.input_size[1])
    with open_slide(path, mpp=cfg.slide_mpp) as slide:
        p = plan(slide, cfg, tile_px)
    loader = DataLoader(_TileStream(path, p, tile_px, cfg, spec), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)  # fmt: skip
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    excluded = 0
    model = model.to(device).eval()
    with h5py.File(tmp, "w") as f, torch.inference_mode():
        feats = rects = units = None
        for batch in loader:
            excluded += batch["excluded"]
            if batch["image"] is None:
                continue
            emb = model.embed(batch["image"].to(device)).float().cpu().numpy()  # [B, D]
            if feats is None:
                feats = f.create_dataset("features", (0, emb.shape[1]), maxshape=(None, emb.shape[1]), dtype="f4")
                rects = f.create_dataset("rects", (0, 4), maxshape=(None, 4), dtype="i8")
                units = f.create_dataset("units", (0,), maxshape=(None,), dtype="i8")
            n = feats.shape[0]
            for ds, values in ((feats, emb), (rects, np.asarray(batch["rect"])), (units, np.asarray(batch["unit"]))):
                ds.resize(n + len(emb), axis=0)
                ds[n:] = values
        if feats is None:  # no tile passed QC: an empty bag, said so
            f.create_dataset("features", (0, 0), dtype="f4")
            f.create_dataset("rects", (0, 4), dtype="i8")
            f.create_dataset("units", (0,), dtype="i8")
        f.attrs.update({"slide": path.name, "excluded": excluded, "tile_px": tile_px, "tile_mpp": cfg.tile_mpp,
                        "model": fingerprint[:16], "preprocessing": spec.preprocessing_hash(opts)})  # fmt: skip
    os.replace(tmp, cache)
    return _load(cache, from_cache=False)


def _load(cache: Path, from_cache: bool) -> SlideFeatures:
    import h5py

    with h5py.File(cache, "r") as f:
        return SlideFeatures(f["features"][()], f["rects"][()], f["units"][()], cache, from_cache,
                             int(f.attrs.get("excluded", 0)))  # fmt: skip
