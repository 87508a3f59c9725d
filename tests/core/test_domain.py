"""The shared input loader refuses DICOM outside a model's modality scope and accepts everything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from loupe.core.domain import standard_loader
from loupe.core.errors import ConfigError, UnsupportedInputError
from loupe.core.models import WeightSpec


def _spec(**changes: object) -> WeightSpec:
    base = dict(name="scoped", architecture="vit_micro_patch8", input_size=(1, 32, 32), mean=(0.5,), std=(0.25,))
    return WeightSpec(**{**base, **changes})


def _dicom(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def test_radiograph_model_refuses_ct_naming_file_modality_and_fix() -> None:
    ct = _dicom("CT_small.dcm")
    with pytest.raises(UnsupportedInputError) as err:
        standard_loader(ct, _spec(modalities=("CR", "DX")))
    msg = str(err.value)
    assert str(ct) in msg and "modality CT" in msg and "CR, DX" in msg and "'modalities' in its weight_spec.json" in msg


def test_in_scope_dicom_and_any_png_are_loaded(tmp_path: Path) -> None:
    spec = _spec(modalities=("CR", "DX"))
    image, meta = standard_loader(_dicom("RG1_UNCR.dcm"), spec)  # a chest CR
    assert meta["modality"] == "CR" and tuple(image.shape) == (1, 32, 32)
    png = tmp_path / "film.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(png)
    image, meta = standard_loader(png, spec)  # no modality: cannot be judged, so it is accepted
    assert "modality" not in meta and tuple(image.shape) == (1, 32, 32)


def test_unscoped_model_accepts_any_modality() -> None:
    image, meta = standard_loader(_dicom("CT_small.dcm"), _spec())
    assert meta["modality"] == "CT" and tuple(image.shape) == (1, 32, 32)


def test_scope_survives_the_spec_file_and_old_specs_have_none(tmp_path: Path) -> None:
    spec = _spec(modalities=("CR", "DX"))
    spec.save(tmp_path / "weight_spec.json")
    assert WeightSpec.load(tmp_path / "weight_spec.json").modalities == ("CR", "DX")
    old = spec.to_dict()
    del old["modalities"]  # a weight_spec.json written before the field existed
    assert WeightSpec.from_dict(old).modalities == ()


@pytest.mark.parametrize("bad", [("cr",), ("C R",), ("",)])
def test_bad_modality_codes_are_refused(bad: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="modalities must be DICOM modality codes in capitals"):
        _spec(modalities=bad)
