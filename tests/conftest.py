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


def _close(a: object, b: object, atol: float, where: str) -> None:
    """``a`` and ``b`` (parsed JSON) equal, numbers within ``atol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], atol, f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, atol, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=atol, nan_ok=True), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


JSON_COLUMNS = ("scores", "decisions", "units_summary", "meta", "artifacts")


def assert_same_table(a, b, atol: float = 1e-6, skip: tuple[str, ...] = ()) -> None:
    """Two predictions / unit tables (same row order) hold the same rows: numbers within ``atol`` (the same inputs
    scored in other batches differ in the last float32 bits), JSON columns (score maps, summaries) compared parsed
    with the same tolerance, everything else exactly; the volatile columns (times, hosts, run ids) and ``skip`` left
    out."""
    import pandas as pd

    from loupe.workflows.scoring import VOLATILE_COLUMNS

    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    cols = [c for c in a.columns if c not in (*VOLATILE_COLUMNS, *skip)]
    plain = [c for c in cols if c not in JSON_COLUMNS]
    pd.testing.assert_frame_equal(a[plain], b[plain], check_exact=False, atol=atol, rtol=0)
    for c in (c for c in cols if c in JSON_COLUMNS):
        for i, (x, y) in enumerate(zip(a[c], b[c], strict=True)):
            _close(_plain(x), _plain(y), atol, f"{c} of row {i}")


def _plain(v: object) -> object:
    """A table cell as plain data: JSON text parsed, a Parquet map (a list of key / value pairs) as a dict, a
    missing value as None."""
    import json

    if isinstance(v, str):
        return json.loads(v)
    if v is None or (isinstance(v, float) and v != v):
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list) and all(isinstance(e, tuple) and len(e) == 2 for e in v):
        return {k: val for k, val in v}
    return v


@pytest.fixture(scope="session")
def same_table():
    """`assert_same_table`, for tests (conftest helpers are not importable under --import-mode=importlib)."""
    return assert_same_table
