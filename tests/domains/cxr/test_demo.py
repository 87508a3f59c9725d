"""The CXR demo pieces: real DICOM inputs from installed packages and an honest demo model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loupe.core.errors import UnsupportedInputError
from loupe.core.io import read_any
from loupe.core.models import load_model_dir
from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.tracking import NullTracker
from loupe.domains.cxr.demo import CORRUPT_NAME, demo_inputs, demo_model


def test_cxr_registers_its_demo() -> None:
    discover_domains()
    info = DOMAINS.get("cxr")
    assert info.demo_inputs is demo_inputs and info.demo_model is demo_model


def test_demo_inputs_are_real_dicom_plus_one_corrupt_file(tmp_path: Path) -> None:
    folder = demo_inputs(tmp_path / "inputs")
    names = sorted(p.name for p in folder.iterdir())
    assert {"RG1_UNCR.dcm", "RG1_J2KR.dcm", CORRUPT_NAME, "SOURCES.txt"} <= set(names)
    chest = read_any(folder / "RG1_UNCR.dcm")
    assert chest.meta["modality"] == "CR" and chest.meta["body_part"] == "CHEST" and chest.array.shape == (1955, 1841)
    with pytest.raises(UnsupportedInputError, match="truncated"):
        read_any(folder / CORRUPT_NAME)
    # run twice: the folder is rebuilt, not appended to
    assert sorted(p.name for p in demo_inputs(tmp_path / "inputs").iterdir()) == names


def test_fallback_demo_model_is_small_labelled_and_loadable(tmp_path: Path) -> None:
    """With no training data reachable, the model is trained on installed images and says so."""
    tracker = NullTracker()
    with tracker.run("demo", experiment="t") as run:
        folder = demo_model(tmp_path / "model", run=run, fast=True, use_shared=False)
    model, spec = load_model_dir(folder)
    assert spec.description.startswith("DEMO MODEL") and spec.domain == "cxr" and spec.version == "demo"
    assert spec.label_names == ("Chest radiograph",) and set(spec.thresholds) == {"Chest radiograph"}
    assert "val_auroc" in run.metrics and run.metrics["train_loss"]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    with torch.inference_mode():
        assert model(torch.zeros(2, *spec.input_size)).shape == (2, 1)
