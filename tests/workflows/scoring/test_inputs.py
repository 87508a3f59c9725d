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


def test_fifos_devices_and_dangling_links_are_failed_rows_not_hangs(tmp_path: Path, model_dir: Path) -> None:
    import os

    import numpy as np
    import pandas as pd
    from PIL import Image

    from loupe.workflows.scoring import ScoreOptions, score

    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(root / "film.png")
    os.mkfifo(root / "pipe.png")  # opening it would block until a writer comes: it must never be opened
    (root / "zero.dcm").symlink_to("/dev/zero")  # reading it never ends
    (root / "gone.png").symlink_to(root / "deleted.png")
    found = collect_inputs(root)
    assert sorted(Path(p).name for p in found.paths) == ["film.png", "gone.png", "pipe.png", "zero.dcm"]
    s = score(ScoreOptions(domain="cxr", input=root, model=f"local-dir:{model_dir}", out=tmp_path / "p.parquet",
                           track=False, num_workers=0))  # fmt: skip
    rows = pd.read_parquet(tmp_path / "p.parquet").set_index("path").status
    assert (s.rows_ok, s.rows_failed) == (1, 3) and rows["film.png"] == "ok"
    assert "is not a regular file" in rows["pipe.png"] and "resolves outside the input root" in rows["zero.dcm"]
    assert "does not exist" in rows["gone.png"]


def test_a_file_name_that_is_not_utf8_is_scored_and_resumed(tmp_path: Path, model_dir: Path) -> None:
    import os

    import numpy as np
    import pandas as pd
    from PIL import Image

    from loupe.workflows.scoring import ScoreOptions, score

    root = tmp_path / "in"
    root.mkdir()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(os.fsencode(root) + b"/film_\xff.png")  # Latin-1 name
    Image.fromarray(np.full((40, 40), 160, np.uint8)).save(root / "ok.png")
    opts = dict(domain="cxr", input=root, model=f"local-dir:{model_dir}", out=tmp_path / "p.parquet", track=False,
                num_workers=0)  # fmt: skip
    first = score(ScoreOptions(**opts))
    assert (first.rows_ok, first.rows_failed) == (2, 0)
    assert sorted(pd.read_parquet(tmp_path / "p.parquet").path) == ["film_\\xff.png", "ok.png"]
    again = score(ScoreOptions(**opts, mode="resume"))
    assert again.resumed == 2 and again.rows_ok == 2
