"""The predictions table: its schema, chunked parts committed atomically, resume state and the final merge.

While scoring runs, each batch of rows is written as ``<out>.parts/part-NNNNNN.parquet`` (temporary file, then
``os.replace``), so a crash loses at most the batch in flight. `PartsTable.finalize` merges the parts (and a
table left by an earlier run) into ``<out>`` with one row per input path, the last row written for a path winning
(so retried failures replace their old row), and replaces ``<out>`` atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from loupe.core.errors import ConfigError

log = logging.getLogger(__name__)

Mode = Literal["new", "resume", "overwrite"]

#: Columns every table has, in order, before the per-label score and decision columns.
PROVENANCE_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("path", pa.string()),
    ("content_sha256", pa.string()),
    ("domain", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_source", pa.string()),
    ("weights_sha256", pa.string()),
    ("preprocessing_hash", pa.string()),
    ("status", pa.string()),
)
#: Columns after the per-label ones.
TRAILING_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("predicted_label", pa.string()),
    ("thresholds", pa.string()),
    ("threshold_source", pa.string()),
    ("meta", pa.string()),
    ("explain_path", pa.string()),
    ("read_ms", pa.float64()),
    ("infer_ms", pa.float64()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
)
#: Columns that legitimately differ between two runs over the same inputs (timing, wall clock).
VOLATILE_COLUMNS = ("read_ms", "infer_ms", "scored_at")


def score_column(label: str) -> str:
    return f"score_{label}"


def decision_column(label: str) -> str:
    return f"decision_{label}"


def table_schema(labels: Sequence[str]) -> pa.Schema:
    """The Arrow schema of a predictions table for a model with these label names."""
    fields = [pa.field(n, t) for n, t in PROVENANCE_FIELDS]
    fields += [pa.field(score_column(lb), pa.float64()) for lb in labels]
    fields += [pa.field(decision_column(lb), pa.bool_()) for lb in labels]
    fields += [pa.field(n, t) for n, t in TRAILING_FIELDS]
    return pa.schema(fields, metadata={b"loupe.labels": json.dumps(list(labels)).encode()})


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by column name; missing keys are null) → an Arrow table with exactly ``schema``."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


class PartsTable:
    """Owns ``<out>``, ``<out>.parts/`` and ``<out>.explain/`` for one scoring run."""

    def __init__(self, out: str | Path, schema: pa.Schema):
        self.out = Path(out).expanduser().resolve()
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.explain_dir = self.out.with_name(self.out.name + ".explain")
        self.schema = schema
        self._next = 0

    # ------------------------------------------------------------------------------------------------ set-up
    def prepare(self, mode: Mode) -> None:
        """Refuse to touch an earlier table unless asked; clear it for ``overwrite``; keep it for ``resume``."""
        existing = [p for p in (self.out, self.parts_dir) if p.exists()]
        if existing and mode == "new":
            raise ConfigError(
                f"{existing[0]} already exists (an earlier scoring run); pass --resume to score only the inputs "
                f"not yet scored, or --overwrite to start again"
            )
        if self.out.exists() and not self.out.is_file():
            raise ConfigError(f"--out {self.out} is a folder; give a file name such as {self.out}/predictions.parquet")
        if mode == "overwrite":
            for p in (self.parts_dir, self.explain_dir):
                shutil.rmtree(p, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        for tmp in self.parts_dir.glob("*.tmp"):  # a part that was being written when a run was killed
            tmp.unlink()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self._parts()), default=-1)

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def sources(self) -> list[Path]:
        """Committed tables in write order: an earlier final table first, then the parts."""
        return ([self.out] if self.out.is_file() else []) + self._parts()

    # ------------------------------------------------------------------------------------------------ resume
    def done_keys(self, weights_sha256: str, preprocessing_hash: str) -> set[str]:
        """``path\\0content_sha256`` of every input already scored ``ok``; refuses tables of another model."""
        done: set[str] = set()
        cols = ["path", "content_sha256", "status", "weights_sha256", "preprocessing_hash"]
        for src in self.sources():
            t = pq.read_table(src, columns=cols).to_pydict()
            for key in ("weights_sha256", "preprocessing_hash"):
                mine = weights_sha256 if key == "weights_sha256" else preprocessing_hash
                other = {v for v in t[key] if v is not None and v != mine}
                if other:
                    raise ConfigError(
                        f"{src} was scored with a different model ({key} {sorted(other)[0]}, this run {mine}); "
                        f"resume only with the same model and preprocessing, or pass --overwrite / another --out"
                    )
            for path, sha, status in zip(t["path"], t["content_sha256"], t["status"], strict=True):
                if status == "ok":
                    done.add(f"{path}\0{sha}")
        return done

    # ------------------------------------------------------------------------------------------------ writing
    def write_part(self, rows: Sequence[dict[str, Any]]) -> Path | None:
        """Commit ``rows`` as the next part (temporary file + atomic rename); returns its path."""
        if not rows:
            return None
        return self.write_arrow(rows_to_table(rows, self.schema))

    def write_arrow(self, table: pa.Table) -> Path | None:
        if table.num_rows == 0:
            return None
        table = table.select(self.schema.names).cast(self.schema)
        dst = self.parts_dir / f"part-{self._next:06d}.parquet"
        tmp = dst.with_name(dst.name + ".tmp")
        pq.write_table(table, tmp)
        _fsync(tmp)
        os.replace(tmp, dst)
        self._next += 1
        return dst

    def finalize(self, inputs: Collection[str] | None = None) -> int:
        """Merge everything committed into ``<out>`` (one row per path, last wins); returns the row count.

        With ``inputs``, rows of paths that are no longer inputs (deleted or moved since an earlier run) are dropped.
        """
        sources = self.sources()
        keep = _last_occurrences(sources)
        if inputs is not None:
            wanted = inputs if isinstance(inputs, (set, frozenset, dict)) else set(inputs)
            gone = [p for p in keep if p not in wanted]
            for p in gone:
                del keep[p]
            if gone:
                log.info("%s: dropped rows of %d paths that are no longer inputs", self.out, len(gone))
        tmp = self.out.with_name(self.out.name + ".tmp")
        n = 0
        with pq.ParquetWriter(tmp, self.schema) as writer:
            for i, src in enumerate(sources):
                t = pq.read_table(src).select(self.schema.names).cast(self.schema)
                mask = [keep.get(p) == (i, j) for j, p in enumerate(t.column("path").to_pylist())]
                t = t.filter(pa.array(mask, pa.bool_()))
                if t.num_rows:
                    writer.write_table(t)
                    n += t.num_rows
        _fsync(tmp)
        os.replace(tmp, self.out)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return n


def _last_occurrences(sources: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """path → (source index, row index) of its last row, reading only the ``path`` column."""
    last: dict[str, tuple[int, int]] = {}
    for i, src in enumerate(sources):
        for j, p in enumerate(pq.read_table(src, columns=["path"]).column("path").to_pylist()):
            last[p] = (i, j)
    return last


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
