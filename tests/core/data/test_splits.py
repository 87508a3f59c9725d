from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from loupe.core.data import leaked_groups, split_by_group, validate_manifest
from loupe.core.errors import ConfigError


def _synthetic(n_groups: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(n_groups)], rng.integers(1, 5, n_groups))
    return pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(len(groups))],
            "group": groups,
            "rare": (rng.random(len(groups)) < 0.05) * 1.0,
        }
    )


def test_no_group_in_two_splits_and_fractions_close() -> None:
    out = split_by_group(_synthetic(), {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert leaked_groups(out) == {}
    shares = out["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.6) < 0.05 and abs(shares["test"] - 0.2) < 0.05


def test_deterministic_given_seed_and_different_across_seeds() -> None:
    frame = _synthetic()
    a, b = split_by_group(frame, seed=7), split_by_group(frame, seed=7)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != split_by_group(frame, seed=8)["split"].tolist()


def test_rare_label_reaches_every_split() -> None:
    out = split_by_group(_synthetic(), seed=0)
    assert set(out.loc[out["rare"] == 1, "split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("fractions", [{"train": 0.9, "test": 0.2}, {"train": -0.1, "test": 1.1}, {}])
def test_bad_fractions_raise_config_error(fractions: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        split_by_group(_synthetic(), fractions)


@pytest.mark.realdata
def test_nih_split_shares_no_patient(shared_data: Path) -> None:
    root = shared_data / "cxr" / "nih14"
    out = split_by_group(nih_manifest(root), seed=0)
    per_patient = out.groupby("group")["split"].nunique()
    assert (per_patient == 1).all() and out["group"].nunique() > 100
    assert validate_manifest(out, root=root) == []


def nih_manifest(root: Path) -> pd.DataFrame:
    """The shared NIH films as a manifest, straight from labels.csv's own 0/1 columns (no domain adapter)."""
    frame = pd.read_csv(root / "labels.csv")
    labels = list(frame.columns[frame.columns.get_loc("Atelectasis") :])  # the 14 one-hot finding columns
    out = pd.DataFrame({"path": "images/" + frame["Image Index"], "group": frame["Patient ID"].astype(str)})
    return pd.concat([out, frame[labels].astype(float)], axis=1)
