from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from loupe.core.config import apply_overrides, build, flatten, load_yaml, to_dict
from loupe.core.errors import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    layer_decay: float = 0.75
    betas: tuple[float, float] = (0.9, 0.999)

    def problems(self) -> list[str]:
        return [] if 0 < self.layer_decay <= 1 else [f"layer_decay: must be in (0, 1], got {self.layer_decay}"]


@dataclass(frozen=True)
class Cfg:
    model: str = "vit_micro_patch8"
    epochs: int = 1
    mode: Literal["mae", "finetune"] = "finetune"
    labels: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_yaml_with_overrides_builds_frozen_dataclass(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: vit_small_patch16\noptim:\n  lr: 0.01\nlabels: [A, B]\n")
    data = apply_overrides(load_yaml(path), ["epochs=5", "optim.betas=[0.8, 0.9]", "checkpoint=null", "optim.lr=1e-2"])
    cfg = build(Cfg, data)
    assert cfg == Cfg(model="vit_small_patch16", epochs=5, labels=["A", "B"], optim=Optim(lr=0.01, betas=(0.8, 0.9)))
    assert flatten(to_dict(cfg))["optim.lr"] == 0.01
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]


def test_every_problem_is_reported_at_once() -> None:
    data = {"epocs": 3, "epochs": "many", "mode": "pretrain", "optim": {"lr": "fast", "layer_decay": 2.0}}
    with pytest.raises(ConfigError) as err:
        build(Cfg, data, source="cfg.yaml")
    msg = str(err.value)
    assert "in cfg.yaml (5 problems)" in msg
    assert "optim.layer_decay: must be in (0, 1], got 2.0" in msg
    assert "epocs: unknown key (did you mean 'epochs'?)" in msg
    assert "epochs: expected int, got 'many'" in msg
    assert "mode: expected one of 'mae', 'finetune', got 'pretrain'" in msg
    assert "optim.lr: expected float, got 'fast'" in msg


def test_cross_field_check_runs_when_types_are_right() -> None:
    with pytest.raises(ConfigError, match=r"optim.layer_decay: must be in \(0, 1\], got 2.0"):
        build(Cfg, {"optim": {"layer_decay": 2.0}})


@pytest.mark.parametrize("bad", ["epochs", "=3", "optim.lr.x=1"])
def test_malformed_overrides(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({"optim": {"lr": 1}}, [bad])


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")
