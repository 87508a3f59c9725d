from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from loupe.workflows.data_cli import app

runner = CliRunner()


def _write(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "a.png").write_bytes(b"x")
    frame = pd.DataFrame({"path": ["a.png"], "Effusion": [1], "group": ["p1"]} | overrides)
    frame.to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_validate_ok_exits_0(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_write(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_validate_problems_exit_1_and_are_listed(tmp_path: Path) -> None:
    manifest = _write(tmp_path, path=["missing.png"], Effusion=[2])
    result = runner.invoke(app, ["validate", str(manifest), "--labels", "Effusion,Edema"], terminal_width=200)
    assert result.exit_code == 1
    for text in ("file not found", "not 1, 0 or empty", "'Edema' is missing"):
        assert text in result.output


def test_validate_unreadable_manifest_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "none.csv")])
    assert result.exit_code == 2


@pytest.mark.realdata
def test_convert_then_split_then_validate_nih(shared_data: Path, tmp_path: Path) -> None:
    labels = shared_data / "cxr" / "nih14" / "labels.csv"
    assert runner.invoke(app, ["convert", "nih", str(labels), "-o", str(tmp_path / "nih.csv")]).exit_code == 0
    assert runner.invoke(app, ["split", str(tmp_path / "nih.csv"), "-o", str(tmp_path / "s.parquet")]).exit_code == 0
    result = runner.invoke(app, ["validate", str(tmp_path / "s.parquet"), "--root", str(labels.parent)])
    assert result.exit_code == 0, result.output


def test_convert_unknown_source_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", "kaggle", str(tmp_path), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2


def test_sources_lists_what_domains_registered() -> None:
    result = runner.invoke(app, ["sources"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("folder", "nih", "chexpert", "mimic"):
        assert name in result.output


def test_unknown_source_suggests_the_close_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", "chexpret", str(tmp_path), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "Did you mean 'chexpert'" in result.output
    result = runner.invoke(app, ["convert", "mimic", str(tmp_path), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "takes 2 input path(s) (METADATA_CSV CHEXPERT_CSV)" in result.output
