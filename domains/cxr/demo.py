"""The chest X-ray demo: real DICOM from installed packages, and a small model that is honest about what it is.

Inputs: the PA chest CR of ``pydicom-data`` in three transfer syntaxes, plus other real DICOM from the same
package and ``pydicom`` (extremity CR, CT, MR, ultrasound) and one truncated copy of the chest film, so the
predictions table shows a ``failed`` row next to the ``ok`` ones.

Model, first that applies:
1. weights of a registered CXR weight tag already in the local cache (``loupe weights list``);
2. a tiny ViT trained on the spot on PneumoniaMNIST (``../shared/data`` or ``LOUPE_SHARED_DATA``), label
   ``Pneumonia``, with the Youden threshold of its validation split stored as the operating threshold; as a
   radiograph model it refuses the CT, MR and ultrasound inputs (``failed: ... outside the scope``);
3. on a machine with neither: a tiny ViT trained on crops of the installed DICOM and scikit-image's bundled
   images to tell a chest radiograph from other images, label ``Chest radiograph`` (any modality is in scope).
Every demo model says "DEMO MODEL" in its spec description; the caller tags its MLflow run ``demo=true``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.core.models import WeightSpec, build_model, save_model
from loupe.core.paths import shared_data_dir
from loupe.core.quickfit import Split, fit_binary, with_youden_threshold
from loupe.core.transforms import ModelInput
from loupe.domains.cxr.models import CXR_MODALITIES

log = logging.getLogger(__name__)

#: (file in pydicom / pydicom-data, what it is)
DEMO_DICOM = (
    ("RG1_UNCR.dcm", "PA chest CR, MONOCHROME1, uncompressed"),
    ("RG1_J2KR.dcm", "the same chest CR, JPEG 2000 lossless"),
    ("RG1_J2KI.dcm", "the same chest CR, JPEG 2000 lossy"),
    ("RG3_J2KR.dcm", "extremity CR, JPEG 2000 lossless"),
    ("CT_small.dcm", "CT slice"),
    ("MR_small.dcm", "MR slice"),
    ("US1_J2KR.dcm", "ultrasound, RGB"),
)
CORRUPT_NAME = "corrupt_truncated_chest.dcm"
#: Training images of the fallback model (uncompressed: quick to read): the chest CR vs other real images.
TRAIN_CHEST = ("RG1_UNCR.dcm",)
TRAIN_OTHER = ("RG3_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "693_UNCR.dcm")
DEMO_SIZE = (1, 32, 32)
DEMO_ARCH = "vit_micro_patch8"


def find_test_dicom(name: str) -> Path | None:
    """A DICOM file from ``pydicom`` / ``pydicom-data`` on disk; never touches the network."""
    from pydicom.data import get_testdata_file

    try:
        p = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - a missing optional data package just means fewer demo files
        return None
    return Path(p) if p else None


def demo_inputs(out_dir: Path) -> Path:
    """Write the demo's input folder (real DICOM + one truncated file + a SOURCES.txt); returns the folder."""
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lines = ["Loupe CXR demo inputs (copied from the installed pydicom / pydicom-data packages):"]
    for name, what in DEMO_DICOM:
        src = find_test_dicom(name)
        if src is None:
            log.warning("demo file %s is not installed (pip install pydicom-data); skipped", name)
            continue
        shutil.copyfile(src, out / name)
        lines.append(f"  {name}: {what}")
    chest = out / DEMO_DICOM[0][0]
    if chest.is_file():
        (out / CORRUPT_NAME).write_bytes(chest.read_bytes()[:4096])  # header only: pixels cut off
        lines.append(f"  {CORRUPT_NAME}: the chest CR cut after 4 KiB, to show a failed row")
    (out / "SOURCES.txt").write_text("\n".join(lines) + "\n")
    return out


def demo_model(work_dir: Path, run: Any = None, fast: bool = False, use_shared: bool = True) -> Path:
    """A small CXR model as a Loupe model folder in ``work_dir`` (see the module docstring for which)."""
    cached = _cached_tag_model(Path(work_dir))
    if cached is not None:
        return cached
    torch.manual_seed(0)
    data = shared_data_dir() if use_shared else None
    npz = data / "cxr" / "pneumoniamnist" / "pneumoniamnist.npz" if data else None
    if npz is not None and npz.is_file():
        spec, train, val = _pneumonia_data(npz, fast)
    else:
        spec, train, val = _chest_film_data(fast)
    model, _ = build_model(spec)
    t0 = time.perf_counter()
    steps = fit_binary(model, train, 30 if fast else 240, run, budget_s=30 if fast else 120)
    spec = with_youden_threshold(model, spec, val, run)
    if run is not None:
        run.log_metrics({"train_seconds": time.perf_counter() - t0})
        run.log_params({"demo_data": spec.description, "steps": steps, "architecture": spec.architecture})
    return save_model(model.eval(), spec, Path(work_dir))


def _cached_tag_model(work_dir: Path) -> Path | None:
    from loupe.core.models.weights import tag_path
    from loupe.core.registry import WEIGHTS

    for e in WEIGHTS.entries():
        spec = e.obj
        if e.domain == "cxr" and isinstance(spec, WeightSpec) and spec.label_names and tag_path(e.name).is_file():
            model, _ = build_model(spec.replace(source=f"tag:{e.name}"))
            desc = f"DEMO RUN with the cached weights of tag {e.name!r}. {spec.description}"
            return save_model(model.eval(), spec.replace(description=desc), work_dir)
    return None


def _spec(
    name: str, label: str, mean: float, std: float, description: str, modalities: tuple[str, ...] = ()
) -> WeightSpec:
    return WeightSpec(
        name=name,
        architecture=DEMO_ARCH,
        task="binary",
        input_size=DEMO_SIZE,
        mean=(mean,),
        std=(std,),
        intensity="grey 0..1 (8-bit / 255, or DICOM VOI-rendered), higher = brighter",
        interpolation="bilinear",
        label_names=(label,),
        domain="cxr",
        version="demo",
        licence="demo only: not for clinical use",
        description=description,
        modalities=modalities,
    )


def _prepare(spec: WeightSpec, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    prep = ModelInput(spec)
    return torch.stack([prep(a) for a in images])  # [N, 1, 32, 32]


def _pneumonia_data(npz: Path, fast: bool) -> tuple[WeightSpec, Split, Split]:
    d = np.load(npz)
    n = 600 if fast else len(d["train_images"])
    x, y = d["train_images"][:n], d["train_labels"][:n].reshape(-1)
    vx, vy = d["val_images"], d["val_labels"].reshape(-1)
    mean, std = float(x.mean() / 255), float(x.std() / 255)
    spec = _spec(
        "cxr-demo-pneumonia",
        "Pneumonia",
        mean,
        std,
        f"DEMO MODEL: a {DEMO_ARCH} trained for seconds on {n} PneumoniaMNIST 28 px films (CC BY 4.0) to score "
        "pneumonia vs normal. A demonstration of the pipeline, not a diagnostic model.",
        modalities=CXR_MODALITIES,
    )
    return spec, (_prepare(spec, x), torch.from_numpy(y).float()), (_prepare(spec, vx), torch.from_numpy(vy).float())


def _chest_film_data(fast: bool) -> tuple[WeightSpec, Split, Split]:
    """Crops of the installed chest CR (label 1) vs crops of other installed images (label 0)."""
    from loupe.core.io import read_any

    pos = [_grey(read_any(p).array) for n in TRAIN_CHEST if (p := find_test_dicom(n))]
    neg = [_grey(read_any(p).array) for n in TRAIN_OTHER if (p := find_test_dicom(n))]
    neg += _skimage_images()
    if not pos or not neg:
        raise RuntimeError("the demo needs pydicom-data installed (pip install pydicom-data) to build its model")
    rng = np.random.default_rng(0)
    per = 48 if fast else 160
    crops = [(_crop(a, rng), 1.0) for a in pos for _ in range(per * len(neg) // len(pos))]
    crops += [(_crop(a, rng), 0.0) for a in neg for _ in range(per)]
    rng.shuffle(crops)
    imgs, labels = [c for c, _ in crops], torch.tensor([lb for _, lb in crops])
    flat = np.concatenate([c.ravel() for c in imgs[:200]])
    spec = _spec(
        "cxr-demo-chest-film",
        "Chest radiograph",
        float(flat.mean()),
        float(flat.std() + 1e-3),
        f"DEMO MODEL: a {DEMO_ARCH} trained for seconds on random crops of {len(pos)} chest CR and {len(neg)} other "
        "images (pydicom-data DICOM, scikit-image samples) to tell a chest radiograph from other images. Built when "
        "no pretrained weights and no training data are reachable; it has seen the demo's own films.",
    )
    x = _prepare(spec, imgs)
    k = len(x) // 5
    return spec, (x[k:], labels[k:]), (x[:k], labels[:k])


def _grey(a: np.ndarray, max_side: int = 256) -> np.ndarray:
    """Grey 0..1, area-downsampled so the longer side is at most ``max_side`` (crops are resized to 32 px)."""
    a = a.astype(np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(-1)
    if a.max() > 1.0:
        a = a / 255.0
    scale = max_side / max(a.shape)
    if scale < 1:
        size = (max(1, round(a.shape[0] * scale)), max(1, round(a.shape[1] * scale)))
        a = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=size, mode="area")[0, 0].numpy()
    return np.clip(a, 0.0, 1.0)


def _skimage_images() -> list[np.ndarray]:
    from skimage import data

    out = []
    for fn in (data.immunohistochemistry, data.retina, data.camera, data.moon, data.brick):
        try:
            out.append(_grey(fn()))
        except Exception:  # noqa: BLE001 - an image that would need a download is simply left out
            continue
    return out


def _crop(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape
    s = rng.uniform(0.6, 1.0)
    ch, cw = max(8, int(h * s)), max(8, int(w * s))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    c = a[top : top + ch, left : left + cw]
    return c[:, ::-1].copy() if rng.random() < 0.5 else c.copy()
