"""A weight spec is user input: sizes, normalisation and builder arguments are checked before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec

BASE = dict(name="s", architecture="vit_micro_patch8", input_size=(1, 32, 32), mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_size": (1, 1_000_000, 32)}, r"height and width must be whole numbers in \[8, 4096\]"),
        ({"input_size": (1, -32, 32)}, r"height and width must be whole numbers"),
        ({"mean": (float("nan"),)}, r"mean/std must be finite"),
        ({"std": (float("inf"),)}, r"mean/std must be finite"),
        ({"model_kwargs": {"depth": 4000}}, r"model_kwargs.depth = 4000 is out of range \(0 to 64\)"),
        ({"model_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, r"model_kwargs.pretrained_cfg_overlay"
         r" is not allowed"),
        ({"model_kwargs": {"checkpoint_path": "/tmp/x.pth"}}, r"is not allowed"),
        ({"model_kwargs": {"arch": "../../etc/x"}}, r"only short names are allowed"),
        ({"model_kwargs": {"layers": [1, 2]}}, r"expected a number, a boolean or a short name, got list"),
    ],
)  # fmt: skip
def test_hostile_specs_are_refused_before_anything_is_built(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WeightSpec(**{**BASE, **changes})


def test_a_spec_file_with_absurd_values_is_refused_with_its_problems(tmp_path: Path) -> None:
    spec = WeightSpec(**BASE).to_dict()
    spec |= {"input_size": [1, 32, 1000000], "model_kwargs": {"depth": 4000}}
    (tmp_path / "weight_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError) as err:
        WeightSpec.load(tmp_path / "weight_spec.json")
    assert "input_size" in str(err.value) and "model_kwargs.depth" in str(err.value)  # every problem at once


def test_ordinary_builder_arguments_pass() -> None:
    spec = WeightSpec(**{**BASE, "model_kwargs": {"drop_path_rate": 0.1, "head": "mil", "mil": "gated",
                                                  "mil_hidden": 128, "normalize_features": True}})  # fmt: skip
    assert spec.model_kwargs["mil"] == "gated"
