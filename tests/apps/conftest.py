"""A dashboard data folder as `loupe demo` leaves one: real DICOM and a PNG scored (with Grad-CAM) into a predictions
table by a registered champion model, the runs in a real MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

INPUTS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "CT_small.dcm")


@pytest.fixture(scope="session")
def scored(tmp_path_factory: pytest.TempPathFactory, make_model) -> tuple[Path, str]:
    """(data folder, tracking URI), made once per session; tests copy the folder before they write to it."""
    from loupe.core.tracking import MlflowTracker
    from loupe.workflows.scoring import ScoreOptions, score

    root = tmp_path_factory.mktemp("dashboard")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    model = make_model(root / "model", modalities=("CR", "DX"))
    with tracker.run("train-cxr-tiny", experiment="cxr", tags={"domain": "cxr", "recipe": "cxr.finetune"}) as run:
        run.log_metrics({"val_macro_auroc": 0.81, "test_macro_auroc": 0.79})
        run.log_model_dir(model)
    tracker.register_model("cxr-tiny", run.run_id, alias="champion")
    with tracker.run("train-cxr-tiny-2", experiment="cxr", tags={"domain": "cxr", "recipe": "cxr.finetune"}) as run2:
        run2.log_metrics({"val_macro_auroc": 0.84, "test_macro_auroc": 0.80})
        run2.log_model_dir(make_model(root / "model2", seed=1, modalities=("CR", "DX")))
    tracker.register_model("cxr-tiny", run2.run_id, alias="challenger")
    inputs = root / "inputs"
    inputs.mkdir()
    for name in INPUTS:
        shutil.copyfile(get_testdata_file(name, download=False), inputs / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8)).save(inputs / "film.png")
    (inputs / "truncated.dcm").write_bytes((inputs / "RG1_UNCR.dcm").read_bytes()[:4096])
    data = root / "data"
    score(ScoreOptions(domain="cxr", input=inputs, model="models:/cxr-tiny@champion", out=data / "cxr" /
                       "predictions.parquet", explain=True, num_workers=0, tracking_uri=uri))  # fmt: skip
    return data, uri


@pytest.fixture
def dashboard(scored: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A fresh copy of the scored data folder (its own review store), and the environment the app reads."""
    data = tmp_path / "data"
    shutil.copytree(scored[0], data)
    monkeypatch.setenv("LOUPE_DASHBOARD_DATA", str(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", scored[1])
    return data, scored[1]
