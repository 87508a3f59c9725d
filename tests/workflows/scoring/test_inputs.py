from __future__ import annotations

from pathlib import Path

import pytest

from loupe.core.errors import ConfigError
from loupe.workflows.scoring.inputs import collect_inputs


def test_walk_picks_files_by_content_and_claimed_extension(inputs: tuple[Path, dict]) -> None:
    root, files = inputs
    got = collect_inputs(root)
    expected = sorted(str(p) for p in files["good"] + files["bad"])
    assert got.paths == expected  # extensionless DICOM in, corrupt .png/.dcm in (they become failed rows)
    assert got.skipped == 1  # labels.csv; the hidden file is not even looked at
    assert not any(".hidden" in p for p in got.paths)


def test_walk_excludes_output_folders(inputs: tuple[Path, dict]) -> None:
    root, files = inputs
    explain = root / "p.parquet.explain"
    explain.mkdir()
    (explain / "map.png").write_bytes(files["good"][0].read_bytes())
    assert not any("explain" in p for p in collect_inputs(root, exclude=[explain]).paths)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    df = pd.DataFrame({"path": ["a.png", "sub/b.dcm", "a.png", "/abs/c.png"], "label": [1, 0, 1, 0]})
    m = tmp_path / f"m{suffix}"
    df.to_csv(m, index=False) if suffix == ".csv" else df.to_parquet(m)
    got = collect_inputs(m)
    assert got.paths == [str(tmp_path / "a.png"), str(tmp_path / "sub/b.dcm"), "/abs/c.png"]


def test_manifest_without_path_column_names_the_fix(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("file,label\na.png,1\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        collect_inputs(m)


def test_missing_input_and_single_file_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        collect_inputs(tmp_path / "nope")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ConfigError, match="single file"):
        collect_inputs(tmp_path / "x.png")
