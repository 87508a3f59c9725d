"""The review store: every reviewer action, append-only, in SQLite (WAL), durable across reloads and restarts.

One row per action: when, who, which case (domain + content identity; the recorded path for the export), which
finding, what the action was (``accept`` / ``reject`` / ``relabel`` a finding, ``comment``, ``claim`` /
``release`` a case), the value before and after, and the model (name, version, weights) whose output was
judged. Rows are never updated or deleted (triggers refuse it): a reviewer who changes their mind adds a row, and
their latest row per finding is their decision. Two reviewers never overwrite each other — each has their own
rows — and a decision that contradicts another reviewer's current one is refused with `Disagreement` until the
second reviewer confirms it (``confirm_disagreement=True``); the check and the write happen in one immediate
transaction, so a decision made by someone else a second earlier is seen.

Values: a finding's reviewed value is ``present`` / ``absent`` (a multi-label or binary finding) or a label name
(a multiclass case relabelled). ``accept`` takes the model's decision as the value, ``reject`` its opposite.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from loupe.core.errors import LoupeError

ACTIONS = ("accept", "reject", "relabel", "comment", "claim", "release")
DECISIONS = ("accept", "reject", "relabel")
PRESENT, ABSENT = "present", "absent"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    domain TEXT NOT NULL,
    content_id TEXT NOT NULL,
    path TEXT,
    finding TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    previous TEXT,
    value TEXT,
    comment TEXT,
    model_name TEXT,
    model_version TEXT,
    weights_sha256 TEXT,
    confirmed_disagreement INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS actions_case ON actions (domain, content_id);
CREATE TRIGGER IF NOT EXISTS actions_no_update BEFORE UPDATE ON actions
    BEGIN SELECT RAISE(ABORT, 'the review store is append-only'); END;
CREATE TRIGGER IF NOT EXISTS actions_no_delete BEFORE DELETE ON actions
    BEGIN SELECT RAISE(ABORT, 'the review store is append-only'); END;
"""


class ReviewStoreError(LoupeError):
    """The review store refused an action (bad value, no reviewer) or could not be opened."""


class Disagreement(ReviewStoreError):
    """A decision contradicts other reviewers' current decisions; ``others`` maps reviewer → their value."""

    def __init__(self, finding: str, value: str, others: dict[str, str]):
        self.finding, self.value, self.others = finding, value, others
        said = ", ".join(f"{r}: {v}" for r, v in sorted(others.items()))
        super().__init__(
            f"{finding!r}: you say {value}, but {said}; confirm the disagreement to record it (both decisions are "
            f"kept and the case is marked disagreed)"
        )


@dataclass(frozen=True)
class Action:
    id: int
    at: str
    reviewer: str
    domain: str
    content_id: str
    path: str | None
    finding: str
    action: str
    previous: str | None
    value: str | None
    comment: str | None
    model_name: str | None
    model_version: str | None
    weights_sha256: str | None
    confirmed_disagreement: bool


@dataclass(frozen=True)
class CaseRef:
    """What a decision is about: the case (domain + content identity), its recorded path, the model judged."""

    domain: str
    content_id: str
    path: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None


class ReviewStore:
    """The store at ``path`` (created on first use). Each call opens its own connection: safe across Streamlit
    sessions and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.is_file() and self.path.stat().st_size > 0
        try:
            with self._connect() as con:
                if existed:
                    _check_intact(con, self.path)
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, str(exc)) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise ReviewStoreError(f"cannot open the review store {self.path}: {exc}") from None
        with closing(con):
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a decision acknowledged on screen survives a power cut
            con.row_factory = sqlite3.Row
            yield con

    # ------------------------------------------------------------------------------------------------ writing
    def decide(
        self,
        reviewer: str,
        case: CaseRef,
        finding: str,
        action: str,
        model_value: str,
        value: str | None = None,
        comment: str | None = None,
        confirm_disagreement: bool = False,
    ) -> Action:
        """Record ``reviewer``'s ``action`` on ``finding`` (the model said ``model_value``): ``accept`` (the
        model's value), ``reject`` (its opposite) or ``relabel`` (``value``). Refuses with `Disagreement` when other
        reviewers' current values differ, unless ``confirm_disagreement``."""
        if action not in DECISIONS:
            raise ReviewStoreError(f"action {action!r} is not a decision; use one of {list(DECISIONS)}")
        new = reviewed_value(action, model_value, value)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")  # the disagreement check and the write see the same state
            try:
                current = _current(con, case, finding)
                others = {r: v for r, v in current.items() if r != reviewer and v != new}
                if others and not confirm_disagreement:
                    raise Disagreement(finding, new, others)
                previous = current.get(reviewer, model_value)
                row = self._insert(con, reviewer, case, finding, action, previous, new, comment, bool(others))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return row

    def note(self, reviewer: str, case: CaseRef, action: str, comment: str | None = None) -> Action:
        """A case-level action: ``comment``, ``claim`` or ``release``."""
        if action not in ("comment", "claim", "release"):
            raise ReviewStoreError(f"action {action!r} is not a case action; use comment, claim or release")
        if action == "comment" and not (comment or "").strip():
            raise ReviewStoreError("a comment needs some text")
        with self._connect() as con:
            return self._insert(con, reviewer, case, "", action, None, None, comment, False)

    def _insert(self, con, reviewer, case, finding, action, previous, value, comment, disagreed) -> Action:
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ReviewStoreError("enter your name as reviewer before recording a decision")
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        cur = con.execute(
            "INSERT INTO actions (at, reviewer, domain, content_id, path, finding, action, previous, value, comment, "
            "model_name, model_version, weights_sha256, confirmed_disagreement) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (at, reviewer, case.domain, case.content_id, case.path, finding, action, previous, value, comment,
             case.model_name, case.model_version, case.weights_sha256, int(disagreed)),
        )  # fmt: skip
        return self.action(cur.lastrowid, con)

    # ------------------------------------------------------------------------------------------------ reading
    def action(self, action_id: int, con: sqlite3.Connection | None = None) -> Action:
        if con is None:
            with self._connect() as c:
                return self.action(action_id, c)
        return _action(con.execute("SELECT * FROM actions WHERE id = ?", (action_id,)).fetchone())

    def actions(self, domain: str | None = None, content_id: str | None = None) -> list[Action]:
        """Every action (of a domain, of a case), oldest first."""
        sql, args = "SELECT * FROM actions WHERE 1=1", []
        if domain is not None:
            sql, args = sql + " AND domain = ?", [*args, domain]
        if content_id is not None:
            sql, args = sql + " AND content_id = ?", [*args, content_id]
        with self._connect() as con:
            return [_action(r) for r in con.execute(sql + " ORDER BY id", args)]

    def decisions(self, domain: str | None = None) -> dict[tuple[str, str], dict[str, str]]:
        """(content_id, finding) → {reviewer: their latest value}."""
        out: dict[tuple[str, str], dict[str, str]] = {}
        for a in self.actions(domain):
            if a.action in DECISIONS:
                out.setdefault((a.content_id, a.finding), {})[a.reviewer] = a.value or ""
        return out

    def claims(self, domain: str | None = None) -> dict[str, str]:
        """content_id → the reviewer holding a claim on it (the latest claim not released)."""
        held: dict[str, str] = {}
        for a in self.actions(domain):
            if a.action == "claim":
                held[a.content_id] = a.reviewer
            elif a.action == "release" and held.get(a.content_id) == a.reviewer:
                del held[a.content_id]
        return held


def _check_intact(con: sqlite3.Connection, path: Path) -> None:
    """Refuse a store SQLite finds damaged: decisions are records, never silently rebuilt or dropped."""
    problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise _damaged(path, "; ".join(problems[:3]))


def _damaged(path: Path, why: str) -> ReviewStoreError:
    return ReviewStoreError(
        f"the review store {path} is damaged ({why}); it was left as it is. Move it aside, recover what SQLite can "
        f"read with `sqlite3 DAMAGED .recover | sqlite3 {path}` (DAMAGED: where you moved it), or restore {path.name} "
        f"from a backup"
    )


def reviewed_value(action: str, model_value: str, value: str | None = None) -> str:
    """The finding's value after ``action`` on a model that said ``model_value`` (``present`` / ``absent`` or a
    label)."""
    if action == "accept":
        return model_value
    if action == "reject":
        if model_value not in (PRESENT, ABSENT):
            raise ReviewStoreError("reject needs a present / absent finding; relabel a multiclass case instead")
        return ABSENT if model_value == PRESENT else PRESENT
    if not value:
        raise ReviewStoreError("relabel needs the new value (present, absent or a label)")
    return value


def model_value(decision: bool | None) -> str:
    return PRESENT if decision else ABSENT


def _current(con: sqlite3.Connection, case: CaseRef, finding: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT reviewer, value FROM actions WHERE domain = ? AND content_id = ? AND finding = ? AND action IN "
        "('accept', 'reject', 'relabel') ORDER BY id",
        (case.domain, case.content_id, finding),
    )
    return {r["reviewer"]: r["value"] for r in rows}


def _action(row: sqlite3.Row) -> Action:
    d = dict(row)
    d["confirmed_disagreement"] = bool(d["confirmed_disagreement"])
    return Action(**d)


def summarise(findings: Iterable[str], decided: dict[str, dict[str, str]]) -> str:
    """A case's review state from its findings and {finding: {reviewer: value}}: ``pending`` (no decision yet),
    ``partial`` (some findings decided), ``reviewed`` (all decided, reviewers agree), ``disagreed``."""
    findings = list(findings)
    if any(len(set(decided.get(f, {}).values())) > 1 for f in findings):
        return "disagreed"
    done = [f for f in findings if decided.get(f)]
    if not done:
        return "pending"
    return "reviewed" if len(done) == len(findings) else "partial"
