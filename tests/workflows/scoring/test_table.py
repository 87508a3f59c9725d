from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from loupe.core.errors import ConfigError
from loupe.workflows.scoring.table import PartsTable, table_schema

SCHEMA = table_schema(("A", "B"))


def _row(path: str, status: str = "ok", sha: str = "s", w: str = "w1", score: float = 0.5) -> dict:
    return {
        "path": path,
        "content_sha256": sha,
        "status": status,
        "weights_sha256": w,
        "preprocessing_hash": "p1",
        "score_A": score if status == "ok" else None,
    }


def test_schema_has_provenance_scores_and_decisions() -> None:
    names = SCHEMA.names
    assert names[:9] == [
        "path",
        "content_sha256",
        "domain",
        "model_name",
        "model_version",
        "model_source",
        "weights_sha256",
        "preprocessing_hash",
        "status",
    ]
    assert {"score_A", "score_B", "decision_A", "decision_B", "thresholds", "explain_path", "scored_at"} <= set(names)


def test_existing_table_is_never_silently_overwritten(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA)
    t.prepare("new")
    t.write_part([_row("a")])
    t.finalize()
    with pytest.raises(ConfigError, match="pass --resume .* or --overwrite"):
        PartsTable(tmp_path / "p.parquet", SCHEMA).prepare("new")
    again = PartsTable(tmp_path / "p.parquet", SCHEMA)
    again.prepare("overwrite")
    assert not (tmp_path / "p.parquet").exists() and again.sources() == []


def test_parts_are_committed_atomically_and_merged_last_row_wins(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA)
    t.prepare("new")
    t.write_part([_row("a"), _row("b", status="failed: unreadable")])
    (t.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half-written")  # a crash mid-write
    assert sorted(p.name for p in t.parts_dir.iterdir()) == ["part-000000.parquet", "part-000001.parquet.tmp"]

    resumed = PartsTable(tmp_path / "p.parquet", SCHEMA)
    resumed.prepare("resume")
    assert not list(resumed.parts_dir.glob("*.tmp"))
    assert resumed.done_keys("w1", "p1") == {"a\0s"}  # failed rows are retried
    resumed.write_part([_row("b", score=0.9)])
    assert resumed.finalize(inputs={"a", "b"}) == 2
    got = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert got["path"] == ["a", "b"] and got["status"] == ["ok", "ok"] and got["score_A"] == [0.5, 0.9]
    assert not resumed.parts_dir.exists()


def test_resume_keeps_only_current_inputs(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA)
    t.prepare("new")
    t.write_part([_row("a"), _row("gone", status="failed: x")])
    assert t.finalize(inputs=["a"]) == 1


def test_resume_refuses_a_table_of_another_model(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA)
    t.prepare("new")
    t.write_part([_row("a", w="other-weights")])
    with pytest.raises(ConfigError, match="different model .*--overwrite"):
        t.done_keys("w1", "p1")


def test_out_must_not_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        PartsTable(tmp_path / "dir.parquet", SCHEMA).prepare("resume")
