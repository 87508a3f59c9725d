"""The default unit reader: one unit per image, its region in the file, the model's scope checked first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from loupe.core.errors import ConfigError, UnsupportedInputError
from loupe.core.models import WeightSpec
from loupe.core.units import input_region, single_image_units


def _spec(**changes: object) -> WeightSpec:
    base = dict(name="scoped", architecture="vit_micro_patch8", input_size=(1, 32, 32), mean=(0.5,), std=(0.25,))
    return WeightSpec(**{**base, **changes})


def _dicom(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def standard_loader(path: Path, spec: WeightSpec):
    """The one unit's image and the file's metadata, the scope checked as scoring does."""
    fu = single_image_units(path, spec)
    spec.check_scope(fu.meta, path)
    (unit,) = list(fu.units)
    assert unit.info.index == 0 and unit.info.kind == "image"
    return unit.image, fu.meta


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


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [("squash", (300, 400), (0, 0, 400, 300)), ("shorter_side_crop", (300, 400), (50, 0, 300, 300)),
     ("shorter_side_crop", (400, 300), (0, 50, 300, 300)), ("center_crop", (300, 400), (184, 134, 32, 32)),
     ("center_crop", (20, 30), (5, 0, 20, 20))],
)  # fmt: skip
def test_the_unit_region_is_what_the_model_sees(mode: str, size: tuple[int, int], expected: tuple) -> None:
    assert input_region(_spec(resize_mode=mode), *size) == expected


def test_one_unit_covering_the_image_with_its_frame(tmp_path: Path) -> None:
    png = tmp_path / "film.png"
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(png)
    fu = single_image_units(png, _spec())
    (unit,) = list(fu.units)
    assert fu.frame == {"width": 80, "height": 48} and unit.info.region == (0, 0, 80, 48)


@pytest.mark.parametrize(
    ("scope", "meta", "message"),
    [
        ({"mpp": {"min": 0.2, "max": 0.6}}, {"mpp": 1.0}, r"mpp is 1, outside \[0.2, 0.6\]"),
        ({"face_found": True}, {"face_found": False}, "face_found is False"),
        ({"face_found": True}, {}, "face_found is missing"),
        ({"stain": ["H&E"]}, {"stain": "IHC"}, r"stain is 'IHC', not one of \['H&E'\]"),
        ({"mpp": {"max": 0.6}}, {"mpp": "n/a"}, "mpp is 'n/a', not a number"),
    ],
)
def test_scope_rules_beyond_modality_refuse_with_the_reason(scope: dict, meta: dict, message: str) -> None:
    spec = _spec(scope=scope)
    with pytest.raises(UnsupportedInputError, match=message) as err:
        spec.check_scope(meta, "x.svs")
    assert "outside the scope of model 'scoped'" in str(err.value)


@pytest.mark.parametrize("meta", [{"mpp": 0.5}, {}, {"stain": "H&E", "mpp": 0.25}])
def test_scope_rules_pass_what_they_allow_and_skip_what_is_unknown(meta: dict) -> None:
    _spec(scope={"mpp": {"min": 0.2, "max": 0.6}, "stain": ["H&E"]}).check_scope(meta, "x.svs")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scope": {"mpp": {"low": 1}}}, "scope rule 'mpp'"),
        ({"outputs": ("scores", "heatmap")}, r"outputs \['heatmap'\] are unknown"),
        ({"aggregation": "median"}, "aggregation 'median' is unknown"),
        ({"aggregation": "topk:0"}, "aggregation 'topk:0' is unknown"),
        ({"aggregation": "attention"}, "needs a model with an 'attention' output"),
        ({"mean": (float("nan"),)}, "must be finite"),
        ({"std": (float("inf"),)}, "must be finite"),
        ({"unit_thresholds": {"x": 0.5}}, "unit_thresholds name labels that are not in label_names"),
    ],
)
def test_bad_outputs_aggregation_and_scope_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(**changes)
