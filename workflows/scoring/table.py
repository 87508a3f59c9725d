"""The predictions table and the unit table: schemas, parts committed atomically, resume state, the final merge.

While scoring runs, each batch is committed as ``<out>.parts/units-NNNNNN.parquet`` (when it has unit rows) and
then ``<out>.parts/part-NNNNNN.parquet`` (temporary file, then ``os.replace``): the file part is the commit, so a
crash loses at most the batch in flight, and a unit part without its file part is an orphan, removed on the next
start. `PartsTable.finalize` merges everything committed (and the tables of an earlier run) into ``<out>`` with
one row per input path, the last row written for a path winning (so retried failures replace their old row),
and into ``<out stem>.units.parquet`` the unit rows of exactly those winning file rows.

Schema version 2 (``loupe.schema`` in the Parquet metadata) keys rows by (``path`` relative to the input root,
``content_id``); tables of version 1 (absolute paths, no content id) are refused for ``--resume``, never mixed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from loupe.core.errors import ConfigError
from loupe.workflows.scoring.inputs import utf8_text

log = logging.getLogger(__name__)

Mode = Literal["new", "resume", "overwrite"]
SCHEMA_VERSION = "2"

SCORES = pa.map_(pa.string(), pa.float64())
DECISIONS = pa.map_(pa.string(), pa.bool_())

#: File-table columns before the per-label score and decision columns.
FILE_HEAD: tuple[tuple[str, pa.DataType], ...] = (
    ("path", pa.string()),
    ("content_id", pa.string()),
    ("content_sha256", pa.string()),
    ("domain", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("model_source", pa.string()),
    ("weights_sha256", pa.string()),
    ("preprocessing_hash", pa.string()),
    ("aggregation", pa.string()),
    ("status", pa.string()),
    ("scores", SCORES),
    ("decisions", DECISIONS),
)
#: File-table columns after the per-label ones.
FILE_TAIL: tuple[tuple[str, pa.DataType], ...] = (
    ("predicted_label", pa.string()),
    ("thresholds", pa.string()),
    ("threshold_source", pa.string()),
    ("n_units", pa.int64()),
    ("n_units_failed", pa.int64()),
    ("units_summary", pa.string()),
    ("meta", pa.string()),
    ("frame", pa.string()),
    ("artifacts", pa.string()),
    ("explain_path", pa.string()),
    ("read_ms", pa.float64()),
    ("infer_ms", pa.float64()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
)
UNIT_HEAD: tuple[tuple[str, pa.DataType], ...] = (
    ("path", pa.string()),
    ("content_id", pa.string()),
    ("unit", pa.int64()),
    ("kind", pa.string()),
    ("level", pa.int64()),
    ("x", pa.int64()),
    ("y", pa.int64()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("frame_index", pa.int64()),
    ("time_s", pa.float64()),
    ("box_x", pa.int64()),
    ("box_y", pa.int64()),
    ("box_width", pa.int64()),
    ("box_height", pa.int64()),
    ("status", pa.string()),
    ("scores", SCORES),
    ("decisions", DECISIONS),
)
UNIT_TAIL: tuple[tuple[str, pa.DataType], ...] = (
    ("attention", pa.float64()),
    ("meta", pa.string()),
    ("artifacts", pa.string()),
)
#: Columns that legitimately differ between two runs over the same inputs (timing, wall clock).
VOLATILE_COLUMNS = ("read_ms", "infer_ms", "scored_at")


def score_column(label: str) -> str:
    return f"score_{label}"


def decision_column(label: str) -> str:
    return f"decision_{label}"


def _schema(head, tail, labels: Sequence[str], kind: str, meta: dict[str, str]) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in head]
    fields += [pa.field(score_column(lb), pa.float64()) for lb in labels]
    fields += [pa.field(decision_column(lb), pa.bool_()) for lb in labels]
    fields += [pa.field(n, t) for n, t in tail]
    md = {"loupe.schema": SCHEMA_VERSION, "loupe.table": kind, "loupe.labels": json.dumps(list(labels)), **meta}
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in md.items()})


def table_schema(labels: Sequence[str], input_root: str = "") -> pa.Schema:
    """The Arrow schema of a predictions (file) table for a model with these label names."""
    return _schema(FILE_HEAD, FILE_TAIL, labels, "files", {"loupe.input_root": utf8_text(input_root)})


def unit_schema(labels: Sequence[str], input_root: str = "") -> pa.Schema:
    """The Arrow schema of a unit table (one row per unit of each file)."""
    return _schema(UNIT_HEAD, UNIT_TAIL, labels, "units", {"loupe.input_root": utf8_text(input_root)})


def rows_to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by column name; missing keys are null) → an Arrow table with exactly ``schema``."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def table_metadata(path: str | Path) -> dict[str, str]:
    """The ``loupe.*`` metadata of a Parquet table written by Loupe (empty for foreign files)."""
    md = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in md.items() if k.startswith(b"loupe.")}


def units_path(out: Path) -> Path:
    """Where the unit table of predictions table ``out`` goes: ``preds.parquet`` → ``preds.units.parquet``."""
    return out.with_name(f"{out.stem}.units{out.suffix or '.parquet'}")


@dataclass(frozen=True)
class Batch:
    """One batch's rows: file rows (one per file finished in it) and the unit rows of those files."""

    files: pa.Table
    units: pa.Table | None


class PartsTable:
    """Owns ``<out>``, ``<out stem>.units.parquet``, ``<out>.parts/`` and ``<out>.artifacts/`` for one run."""

    def __init__(self, out: str | Path, schema: pa.Schema, units: pa.Schema | None = None):
        self.out = Path(out).expanduser().resolve()
        self.units_out = units_path(self.out)
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.artifacts_dir = self.out.with_name(self.out.name + ".artifacts")
        self.schema, self.unit_schema = schema, units
        self._next = 0

    # ------------------------------------------------------------------------------------------------ set-up
    def check(self, mode: Mode) -> None:
        """Refuse, before any work, what ``mode`` cannot do with what is on disk."""
        if self.out.exists() and not self.out.is_file():
            raise ConfigError(f"--out {self.out} is a folder; give a file name such as {self.out}/predictions.parquet")
        existing = [p for p in (self.out, self.parts_dir) if p.exists()]
        if existing and mode == "new":
            raise ConfigError(
                f"{existing[0]} already exists (an earlier scoring run); pass --resume to score only the inputs "
                f"not yet scored, or --overwrite to start again"
            )
        if mode == "resume":
            for src in self.sources():
                self._check_resumable(src)

    def _check_resumable(self, src: Path) -> None:
        try:
            md = table_metadata(src)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
            raise ConfigError(
                f"{src} cannot be read ({type(exc).__name__}: {exc}); move it aside (or delete it) and --resume "
                f"again, or pass --overwrite"
            ) from None
        if md.get("loupe.schema") != SCHEMA_VERSION:
            raise ConfigError(
                f"{src} was written by an earlier Loupe (predictions table schema "
                f"{md.get('loupe.schema', '1')}, this one writes {SCHEMA_VERSION}: rows keyed by path relative to the "
                f"input and content identity) and cannot be resumed; pass --overwrite to score again, or a new --out"
            )
        root = self.schema.metadata.get(b"loupe.input_root", b"").decode()
        if md.get("loupe.input_root", root) != root:
            raise ConfigError(
                f"{src} was scored from another input ({md['loupe.input_root']}, this run {root}); resume with that "
                f"--input, or pass --overwrite / another --out"
            )

    def prepare(self, mode: Mode) -> None:
        """After `check`: clear an earlier table for ``overwrite``; keep it for ``resume``; tidy crash leftovers."""
        self.check(mode)
        if mode == "overwrite":
            for p in (self.parts_dir, self.artifacts_dir, self.out.with_name(self.out.name + ".explain")):
                shutil.rmtree(p, ignore_errors=True)
            self.out.unlink(missing_ok=True)
            self.units_out.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        for tmp in self.parts_dir.glob("*.tmp"):  # a part that was being written when a run was killed
            tmp.unlink()
        numbers = {_number(p) for p in self._parts()}
        for orphan in self.parts_dir.glob("units-*.parquet"):  # killed between the unit part and its file part
            if _number(orphan) not in numbers:
                orphan.unlink()
        self._next = 1 + max(numbers, default=-1)

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []

    def sources(self) -> list[Path]:
        """Committed file tables in write order: an earlier final table first, then the parts."""
        return ([self.out] if self.out.is_file() else []) + self._parts()

    def _unit_source(self, src: Path) -> Path:
        return self.units_out if src == self.out else src.with_name(src.name.replace("part-", "units-", 1))

    # ------------------------------------------------------------------------------------------------ resume
    def done_keys(self, provenance: dict[str, str]) -> set[str]:
        """``path\\0content_id`` of every input already scored ``ok``; refuses tables of another model.

        ``provenance`` holds ``weights_sha256``, ``preprocessing_hash`` and ``aggregation`` of this run.
        """
        done: set[str] = set()
        keys = ("weights_sha256", "preprocessing_hash", "aggregation")
        for src in self.sources():
            t = pq.read_table(src, columns=["path", "content_id", "status", *keys]).to_pydict()
            for key in keys:
                mine = provenance[key]
                other = {v for v in t[key] if v is not None and v != mine}
                if other:
                    raise ConfigError(
                        f"{src} was scored with a different model ({key} {sorted(other)[0]}, this run {mine}); "
                        f"resume only with the same model and preprocessing, or pass --overwrite / another --out"
                    )
            for path, cid, status in zip(t["path"], t["content_id"], t["status"], strict=True):
                if status == "ok":
                    done.add(f"{path}\0{cid}")
        return done

    # ------------------------------------------------------------------------------------------------ writing
    def write(self, batch: Batch) -> Path | None:
        """Commit one batch: its unit part (if any), then its file part; returns the file part's path."""
        if batch.files.num_rows == 0:
            return None
        n = self._next
        if batch.units is not None and batch.units.num_rows and self.unit_schema is not None:
            _atomic_parquet(batch.units.select(self.unit_schema.names).cast(self.unit_schema), self._name("units", n))
        dst = self._name("part", n)
        _atomic_parquet(batch.files.select(self.schema.names).cast(self.schema), dst)
        self._next += 1
        return dst

    def write_part(self, rows: Sequence[dict[str, Any]], unit_rows: Sequence[dict[str, Any]] = ()) -> Path | None:
        """`write` for rows as dicts (tests, small callers)."""
        units = rows_to_table(unit_rows, self.unit_schema) if unit_rows and self.unit_schema is not None else None
        return self.write(Batch(rows_to_table(rows, self.schema), units))

    def _name(self, kind: str, n: int) -> Path:
        return self.parts_dir / f"{kind}-{n:06d}.parquet"

    def finalize(self, inputs: Collection[str] | None = None) -> int:
        """Merge everything committed into ``<out>`` (one row per path, last wins) and, with a unit schema, the
        winning rows' units into the unit table; returns the file-row count.

        With ``inputs`` (recorded paths), rows of paths that are no longer inputs (deleted or moved since an earlier
        run) are dropped.
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
        n = _merge(sources, self.schema, self.out, lambda i, p, j: keep.get(p) == (i, j))
        if self.unit_schema is not None:
            unit_sources = [self._unit_source(s) for s in sources]
            winner = {p: i for p, (i, _) in keep.items()}
            _merge(unit_sources, self.unit_schema, self.units_out, lambda i, p, j: winner.get(p) == i)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return n


def _merge(sources: list[Path], schema: pa.Schema, out: Path, wanted) -> int:
    """Rows of ``sources`` for which ``wanted(source index, path, row index)`` holds → ``out``, atomically."""
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for i, src in enumerate(sources):
            if not src.is_file():
                continue
            t = pq.read_table(src).select(schema.names).cast(schema)
            mask = [bool(wanted(i, p, j)) for j, p in enumerate(t.column("path").to_pylist())]
            t = t.filter(pa.array(mask, pa.bool_()))
            if t.num_rows:
                writer.write_table(t)
                n += t.num_rows
    _fsync(tmp)
    os.replace(tmp, out)
    return n


def _last_occurrences(sources: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """path → (source index, row index) of its last row, reading only the ``path`` column."""
    last: dict[str, tuple[int, int]] = {}
    for i, src in enumerate(sources):
        for j, p in enumerate(pq.read_table(src, columns=["path"]).column("path").to_pylist()):
            last[p] = (i, j)
    return last


def _number(part: Path) -> int:
    return int(part.stem.split("-")[1])


def _atomic_parquet(table: pa.Table, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    pq.write_table(table, tmp)
    _fsync(tmp)
    os.replace(tmp, dst)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
