from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.core.models import WeightSpec, build_model, save_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder beside the repository (``../shared/data``); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent: real-data tests need the shared data folder beside the repo")
    return SHARED_DATA


LABELS = ("Effusion", "Pneumonia")


def tiny_spec(**changes: object) -> WeightSpec:
    """A 1-channel 32 px model on a core-registered architecture (so Ray actors can rebuild it too)."""
    base = WeightSpec(
        name="tiny-cxr",
        architecture="vit_micro_patch8",
        task="multilabel",
        input_size=(1, 32, 32),
        mean=(0.5,),
        std=(0.25,),
        label_names=LABELS,
        thresholds={"Pneumonia": 0.3},
        domain="cxr",
        version="7",
    )
    return base.replace(**changes)


def make_model_dir(path: Path, seed: int = 0, **spec_changes: object) -> Path:
    torch.manual_seed(seed)
    spec = tiny_spec(**spec_changes)
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # spread the scores so decisions differ between inputs
    return save_model(model.eval(), spec, path)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def write_inputs(root: Path, n_png: int = 10) -> dict[str, list[Path]]:
    """A folder as users send them: PNGs (8/16-bit, grey/RGB, nested), DICOM with and without an extension,
    a truncated PNG, a garbage .dcm, a CSV and a hidden file (the last two are not inputs)."""
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(0)
    good, bad = [], []
    (root / "nested" / "deeper").mkdir(parents=True)
    for i in range(n_png):
        sub = root if i % 3 else root / "nested" / "deeper"
        p = sub / f"img_{i:03d}.png"
        if i % 4 == 1:
            Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(p)
        elif i % 4 == 2:
            Image.fromarray(rng.integers(0, 65535, (64, 50), dtype=np.uint16)).save(p)
        else:
            Image.fromarray(rng.integers(0, 255, (64, 64 + i), dtype=np.uint8)).save(p)
        good.append(p)
    ct = Path(get_testdata_file("CT_small.dcm", download=False))
    shutil.copyfile(ct, root / "ct.dcm")
    shutil.copyfile(ct, root / "nested" / "IM0001")  # DICOM without an extension: found by content
    good += [root / "ct.dcm", root / "nested" / "IM0001"]
    (root / "truncated.png").write_bytes(good[0].read_bytes()[:60])
    (root / "garbage.dcm").write_bytes(b"this is not a DICOM file" * 10)
    bad += [root / "truncated.png", root / "garbage.dcm"]
    (root / "labels.csv").write_text("path,label\nimg_000.png,1\n")
    (root / ".hidden.png").write_bytes(good[0].read_bytes())
    return {"good": sorted(good), "bad": sorted(bad)}


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, dict[str, list[Path]]]:
    root = tmp_path / "inputs"
    root.mkdir()
    return root, write_inputs(root)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throw-away MLflow store; LOUPE_HOME too, so nothing touches the user's home."""
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def make_model() -> object:
    """``make_model(path, seed=0, **spec_changes) -> model folder``."""
    return make_model_dir


@pytest.fixture(scope="session")
def make_inputs() -> object:
    """``make_inputs(root, n_png=10) -> {"good": [...], "bad": [...]}``."""
    return write_inputs
