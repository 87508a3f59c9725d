from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loupe.core.errors import ConfigError
from loupe.workflows.scoring.table import PartsTable, table_metadata, table_schema, unit_schema, units_path

SCHEMA = table_schema(("A", "B"), "/data/in")
UNITS = unit_schema(("A", "B"), "/data/in")
PROV = {"weights_sha256": "w1", "preprocessing_hash": "p1", "aggregation": "mean"}


def _row(path: str, status: str = "ok", cid: str = "sha256:s", w: str = "w1", score: float = 0.5) -> dict:
    return {
        "path": path,
        "content_id": cid,
        "status": status,
        "weights_sha256": w,
        "preprocessing_hash": "p1",
        "aggregation": "mean",
        "score_A": score if status == "ok" else None,
        "scores": [("A", score)] if status == "ok" else None,
    }


def _unit(path: str, i: int, score: float = 0.5) -> dict:
    return {"path": path, "content_id": "sha256:s", "unit": i, "status": "ok", "score_A": score, "x": 10 * i}


def test_schemas_have_provenance_scores_maps_and_wide_columns() -> None:
    names = SCHEMA.names
    assert names[:11] == ["path", "content_id", "content_sha256", "domain", "model_name", "model_version",
                          "model_source", "weights_sha256", "preprocessing_hash", "aggregation", "status"]  # fmt: skip
    assert {"scores", "decisions", "score_A", "decision_B", "thresholds", "n_units", "artifacts", "frame"} <= set(names)
    assert SCHEMA.field("scores").type == pa.map_(pa.string(), pa.float64())
    assert {"unit", "kind", "level", "x", "y", "width", "height", "frame_index", "time_s", "box_x", "attention",
            "score_A", "scores"} <= set(UNITS.names)  # fmt: skip
    assert units_path(Path("/o/preds.parquet")) == Path("/o/preds.units.parquet")


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
    assert resumed.done_keys(PROV) == {"a\0sha256:s"}  # failed rows are retried
    resumed.write_part([_row("b", score=0.9)])
    assert resumed.finalize(inputs={"a", "b"}) == 2
    got = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert got["path"] == ["a", "b"] and got["status"] == ["ok", "ok"] and got["score_A"] == [0.5, 0.9]
    assert got["scores"] == [[("A", 0.5)], [("A", 0.9)]]
    assert not resumed.parts_dir.exists()
    assert table_metadata(tmp_path / "p.parquet")["loupe.input_root"] == "/data/in"


def test_unit_rows_follow_the_winning_file_row_and_orphans_are_dropped(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA, UNITS)
    t.prepare("new")
    t.write_part([_row("a")], [_unit("a", 0, 0.1), _unit("a", 1, 0.2)])
    t.write_part([_row("b")], [_unit("b", 0)])
    (t.parts_dir / "units-000007.parquet").write_bytes((t.parts_dir / "units-000001.parquet").read_bytes())
    t2 = PartsTable(tmp_path / "p.parquet", SCHEMA, UNITS)  # killed after a unit part, before its file part
    t2.prepare("resume")
    assert not (t2.parts_dir / "units-000007.parquet").exists()
    t2.write_part([_row("a", score=0.7)], [_unit("a", 0, 0.7)])  # "a" scored again: its new units replace the old
    t2.finalize(inputs={"a", "b"})
    units = pq.read_table(units_path(tmp_path / "p.parquet")).to_pydict()
    assert sorted(zip(units["path"], units["unit"], units["score_A"], strict=True)) == [("a", 0, 0.7), ("b", 0, 0.5)]
    assert table_metadata(units_path(tmp_path / "p.parquet"))["loupe.table"] == "units"


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
        t.done_keys(PROV)


def test_a_table_of_the_previous_schema_is_refused_not_mixed(tmp_path: Path) -> None:
    """Tables written before scoring units (absolute paths, no content id) cannot be resumed."""
    old = pa.table({"path": ["/abs/a.png"], "content_sha256": ["s"], "status": ["ok"], "weights_sha256": ["w1"],
                    "preprocessing_hash": ["p1"]})  # fmt: skip
    pq.write_table(old, tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match=r"written by an earlier Loupe \(predictions table schema 1.*--overwrite"):
        PartsTable(tmp_path / "p.parquet", SCHEMA).prepare("resume")
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 1  # untouched
    PartsTable(tmp_path / "p.parquet", SCHEMA).prepare("overwrite")
    assert not (tmp_path / "p.parquet").exists()


def test_resume_from_another_input_root_is_refused(tmp_path: Path) -> None:
    t = PartsTable(tmp_path / "p.parquet", SCHEMA)
    t.prepare("new")
    t.write_part([_row("a")])
    t.finalize()
    with pytest.raises(ConfigError, match=r"scored from another input \(/data/in, this run /elsewhere\)"):
        PartsTable(tmp_path / "p.parquet", table_schema(("A", "B"), "/elsewhere")).prepare("resume")


def test_out_must_not_be_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        PartsTable(tmp_path / "dir.parquet", SCHEMA).prepare("resume")
