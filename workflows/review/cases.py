"""Predictions tables → review cases, through each domain's registered builder (or the default one).

What the dashboard calls: it never reads table columns itself beyond the queue's sort keys, so every domain's
cases appear through the one contract (`loupe.core.review`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from loupe.core.errors import ConfigError
from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.review import CaseContext, ReviewCase, default_case
from loupe.workflows.scoring.table import SCHEMA_VERSION, table_metadata, units_path


@dataclass(frozen=True)
class TableInfo:
    """A predictions table found under a folder: where, which domain(s), how many rows, when written."""

    path: Path
    domains: tuple[str, ...]
    rows: int
    mtime: float


def find_tables(root: str | Path) -> list[TableInfo]:
    """Every Loupe predictions table (schema 2) under ``root``, newest first; other Parquet files are ignored."""
    found = []
    for p in sorted(Path(root).rglob("*.parquet")):
        if ".parts" in p.parent.name or p.name.endswith(".units.parquet"):
            continue
        try:
            md = table_metadata(p)
            if md.get("loupe.schema") != SCHEMA_VERSION or md.get("loupe.table") != "files":
                continue
            t = pq.read_table(p, columns=["domain"])
        except Exception:  # noqa: BLE001 - a damaged or foreign Parquet file is simply not a table to review
            continue
        domains = tuple(sorted({d for d in t.column("domain").to_pylist() if d}))
        found.append(TableInfo(p.resolve(), domains, t.num_rows, p.stat().st_mtime))
    return sorted(found, key=lambda t: -t.mtime)


def case_context(table: Path) -> CaseContext:
    """The input root and folder of a predictions table (refuses tables that are not Loupe schema 2)."""
    md = table_metadata(table)
    if md.get("loupe.schema") != SCHEMA_VERSION or md.get("loupe.table") != "files":
        raise ConfigError(
            f"{table} is not a Loupe predictions table of schema {SCHEMA_VERSION}; score the inputs again with "
            f"`loupe score` (older tables hold absolute paths and no content identity)"
        )
    return CaseContext(Path(md.get("loupe.input_root", "")), table.resolve().parent)


def read_rows(table: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The file rows of a predictions table, and its unit rows grouped by path (empty without a unit table)."""
    rows = pq.read_table(table).to_pylist()
    units: dict[str, list[dict[str, Any]]] = {}
    upath = units_path(table)
    if upath.is_file():
        for u in pq.read_table(upath).to_pylist():
            units.setdefault(u["path"], []).append(u)
    return rows, units


def build_case(row: dict[str, Any], units: list[dict[str, Any]], ctx: CaseContext) -> ReviewCase:
    """One row → its review case, by the row's domain's builder (the default one when it registered none)."""
    discover_domains()
    domain = str(row.get("domain") or "")
    info = DOMAINS.get(domain) if domain in DOMAINS else None
    builder = info.review_case if info is not None and info.review_case is not None else None
    return builder(row, units, ctx) if builder else default_case(row, units, ctx, domain)


def review_cases(table: str | Path) -> Iterator[ReviewCase]:
    """Every row of a predictions table as a review case, in table order."""
    table = Path(table)
    ctx = case_context(table)
    rows, units = read_rows(table)
    for row in rows:
        yield build_case(row, units.get(row["path"], []), ctx)
