"""The forensics demo: real pictures and a clip from installed packages, one manipulated on purpose, and a small
detector that is honest about what it is.

Inputs (all from scikit-image's bundled images):
- ``astronaut.png`` (a real photograph with a face) and ``coffee.png`` (a real photograph without one);
- ``astronaut_copy_move.png``: the astronaut with a block of the picture copied over another place (a copy-move
  forgery, made here; ``SOURCES.txt`` says where);
- ``astronaut_clip.mp4``: a 2 s clip panning over the astronaut (OpenCV's MPEG-4 writer), scored by face crops;
- ``corrupt_truncated_clip.mp4``: the first 4 KiB of that clip, so the table shows a ``failed`` row.

Model, first that applies:
1. a micro ViT trained for a minute on the real and StyleGAN2 faces of ``../shared/data/faces/real_vs_stylegan2``
   (or ``LOUPE_SHARED_DATA``), reading the central 64 px unresampled (the artifact-preserving preset), label
   ``Fake``, with its validation Youden threshold stored;
2. elsewhere: the same ViT trained on crops of scikit-image's bundled photographs against the same crops
   downscaled by 2 and upscaled back (``Fake`` = resampled: the interpolation trace generators and edits leave).
Its spec says DEMO MODEL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.core.models import save_model
from loupe.core.paths import shared_data_dir
from loupe.core.quickfit import train_demo_model
from loupe.domains.forensics.models import forensics_spec

log = logging.getLogger(__name__)

DEMO_ARCH = "forensics_vit_micro_patch8"
IMG_SIZE = 64
CLIP_NAME = "astronaut_clip.mp4"
CORRUPT_NAME = "corrupt_truncated_clip.mp4"


def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def copy_move(a: np.ndarray, size: int = 96) -> np.ndarray:
    """``a`` with the ``size`` block at its top left quarter pasted over its bottom right quarter."""
    out = a.copy()
    h, w = a.shape[:2]
    src, dst = (h // 4, w // 4), (3 * h // 4 - size, 3 * w // 4 - size)
    out[dst[0] : dst[0] + size, dst[1] : dst[1] + size] = a[src[0] : src[0] + size, src[1] : src[1] + size]
    return out


def write_clip(a: np.ndarray, dst: Path, seconds: float = 2.0, fps: int = 10) -> Path:
    """A clip of ``seconds`` panning slowly over the RGB picture ``a`` (MPEG-4 part 2, which OpenCV always writes)."""
    import cv2

    h, w = a.shape[:2]
    ch, cw = (h * 3 // 4) // 2 * 2, (w * 3 // 4) // 2 * 2
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (cw, ch))
    try:
        n = int(seconds * fps)
        for i in range(n):
            dx = int((w - cw) * i / max(1, n - 1))
            writer.write(cv2.cvtColor(np.ascontiguousarray(a[:ch, dx : dx + cw]), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return dst


def demo_inputs(out_dir: Path) -> Path:
    """Write the demo's input folder (see the module docstring); returns the folder."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    Image.fromarray(photos["astronaut"]).save(out / "astronaut.png")
    Image.fromarray(photos["coffee"]).save(out / "coffee.png")
    Image.fromarray(copy_move(photos["astronaut"])).save(out / "astronaut_copy_move.png")
    clip = write_clip(photos["astronaut"], out / CLIP_NAME)
    (out / CORRUPT_NAME).write_bytes(clip.read_bytes()[:4096])
    (out / "SOURCES.txt").write_text(
        "Loupe forensics demo inputs, from scikit-image's bundled images (public domain / CC0):\n"
        "astronaut.png, coffee.png: real photographs\n"
        "astronaut_copy_move.png: astronaut.png with a 96 px block copied from the top-left quarter onto the "
        "bottom-right quarter (a copy-move forgery made by the demo)\n"
        f"{CLIP_NAME}: a 2 s pan over astronaut.png; {CORRUPT_NAME}: its first 4 KiB\n"
    )
    return out


def demo_model(work_dir: Path, run: Any = None, fast: bool = False) -> Path:
    """The demo detector (see the module docstring) as a Loupe model folder in ``work_dir``."""
    torch.manual_seed(0)
    data = shared_data_dir()
    faces = data / "faces" / "real_vs_stylegan2" / "data.csv" if data else None
    if faces is not None and faces.is_file():
        images, labels, what = _stylegan_faces(faces, fast)
    else:
        images, labels, what = _resampled_crops(fast)
    spec = forensics_spec(
        "forensics-demo", DEMO_ARCH, img_size=IMG_SIZE, version="demo", licence="demo only: not for casework",
        description=f"DEMO MODEL: a {DEMO_ARCH} trained for seconds on {what}, reading the central {IMG_SIZE} px "
        "unresampled. A demonstration of the pipeline, not a forensic detector.",
    )  # fmt: skip
    model, spec = train_demo_model(spec, images, labels, run, steps=40 if fast else 400, budget_s=15 if fast else 75,
                                   augment=_hflip)  # fmt: skip
    return save_model(model, spec, Path(work_dir))


def _hflip(x: torch.Tensor) -> torch.Tensor:
    """A left-right flip of the whole batch half the time (faces and photographs have no left or right)."""
    return x.flip(3) if bool(torch.randint(0, 2, ())) else x


def _stylegan_faces(csv: Path, fast: bool) -> tuple[list[np.ndarray], np.ndarray, str]:
    from loupe.core.io import read_any
    from loupe.domains.forensics.data import faces_csv

    frame = faces_csv(csv)
    if fast:
        frame = frame.groupby("label", group_keys=False).head(150)
    images = [np.asarray(read_any(csv.parent / p).array)[..., :3] for p in frame["path"]]
    labels = (frame["label"].astype(str).str.lower() == "fake").to_numpy(np.float32)
    return images, labels, f"{len(images)} real and StyleGAN2 faces (real_vs_stylegan2, test use only)"


def _resampled_crops(fast: bool) -> tuple[list[np.ndarray], np.ndarray, str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for a in _photos().values():
        for _ in range(40 if fast else 150):
            s = 128
            top, left = rng.integers(0, a.shape[0] - s + 1), rng.integers(0, a.shape[1] - s + 1)
            crop = a[top : top + s, left : left + s]
            small = Image.fromarray(crop).resize((s // 2, s // 2), Image.Resampling.BILINEAR)
            images += [crop, np.asarray(small.resize((s, s), Image.Resampling.BILINEAR))]
            labels += [0.0, 1.0]
    return images, np.array(labels, np.float32), "crops of scikit-image's photographs vs the same crops resampled"
