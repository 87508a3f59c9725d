"""Shared fixtures of the forensics unit/scoring tests: a tiny binary face model spec, clips written by OpenCV,
frames without a face, a real face picture and the real FaceForensics++ clips."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from loupe.core.models import WeightSpec

FACE = Path("faces") / "real_vs_stylegan2" / "images" / "real" / "real_1.jpg"
FFPP = Path("faces") / "videos" / "ffpp" / "original_sequences" / "youtube" / "c23" / "videos"


def fake_spec(**changes: object) -> WeightSpec:
    """A binary ``Fake`` detector on the core-registered micro ViT at 32 px RGB."""
    base = WeightSpec(
        name="tiny-fake",
        architecture="vit_micro_patch8",
        task="binary",
        input_size=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        label_names=("Fake",),
        thresholds={"Fake": 0.5},
        domain="forensics",
        version="1",
    )
    return base.replace(**changes)


@pytest.fixture
def spec() -> WeightSpec:
    return fake_spec()


@pytest.fixture(scope="session")
def spec_factory() -> Callable[..., WeightSpec]:
    return fake_spec


def write_clip(path: Path, frames: Sequence[np.ndarray], fps: float = 10.0, fourcc: str = "") -> Path:
    """Write RGB uint8 ``frames`` (all one size) as a clip (``mp4v`` for .mp4/.mov, ``MJPG`` otherwise)."""
    import cv2

    h, w = frames[0].shape[:2]
    code = fourcc or ("mp4v" if path.suffix in (".mp4", ".mov") else "MJPG")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*code), fps, (w, h))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        writer.write(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="session")
def clip_writer() -> Callable[..., Path]:
    return write_clip


def no_face_frames(n: int, size: tuple[int, int] = (240, 320), seed: int = 0) -> list[np.ndarray]:
    """Frames without a face: a colour gradient with a drifting bright square over mild noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        f = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (i * 7) % 256)], -1).astype(np.int16)
        f += rng.integers(-12, 12, f.shape, dtype=np.int16)
        x = (i * 5) % (w - 40)
        f[40:80, x : x + 40] = 230
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def blank_frames() -> Callable[..., list[np.ndarray]]:
    return no_face_frames


@pytest.fixture(scope="session")
def face_rgb(shared_data: Path) -> np.ndarray:
    """A real frontal face (300 x 300 RGB, the face about 250 px wide)."""
    from PIL import Image

    with Image.open(shared_data / FACE) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="session")
def face_file(shared_data: Path) -> Path:
    return shared_data / FACE


@pytest.fixture(scope="session")
def ffpp_real(shared_data: Path) -> list[Path]:
    """The three real FaceForensics++ c23 clips (004, 519, 634)."""
    return [shared_data / FFPP / f"{n}.mp4" for n in ("004", "519", "634")]
