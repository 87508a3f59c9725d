"""The review store under SIGKILL at random points, and a damaged store: never a lost acknowledged decision, never a
duplicate, never an unreadable store; damage is reported with the way to repair it, not rebuilt silently."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loupe.workflows.review.store import ReviewStore, ReviewStoreError

WRITER = """
import sys
from loupe.workflows.review.store import CaseRef, ReviewStore
store = ReviewStore(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 100000):
    case = CaseRef("cxr", f"sha256:{i:08d}", f"films/{i}.dcm", "cxr-vit", "3", "w" * 64)
    store.decide("dr-a", case, "Effusion", "accept", "positive", comment=f"write {i}")
    print(i, flush=True)  # acknowledged: the decision is committed
"""


def test_sigkill_at_random_points_never_loses_or_doubles_a_decision(tmp_path: Path) -> None:
    db = tmp_path / "reviews.sqlite"
    rng = random.Random(7)
    acknowledged: list[int] = []
    start = 0
    for round_ in range(4):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(start)], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # the writer is up and has committed once
        assert first, "the writer did not start"
        acknowledged.append(int(first))
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
        acknowledged += [int(x) for x in rest.split()]
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        store = ReviewStore(db)  # opens: the store is readable after every kill
        written = [int(a.comment.split()[1]) for a in store.actions("cxr")]
        assert len(written) == len(set(written)), "a decision was recorded twice"
        assert set(acknowledged) <= set(written), "an acknowledged decision is missing"
        # unacknowledged rows: at most the one committed but not yet printed when each kill came
        assert len(set(written) - set(acknowledged)) <= round_ + 1
        start = max(written) + 1
    assert len(acknowledged) > 4  # the kills came at different points, some after several writes


def test_a_damaged_store_is_refused_by_name_with_the_repair_and_left_untouched(tmp_path: Path) -> None:
    db = tmp_path / "reviews.sqlite"
    ReviewStore(db)  # a real store with its schema
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=DELETE")  # fold the WAL in, so the damage below hits the only copy
    con.close()
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree header and cells
    db.write_bytes(bytes(data))
    with pytest.raises(ReviewStoreError) as err:
        ReviewStore(db)
    msg = str(err.value)
    assert str(db) in msg and "damaged" in msg and ".recover" in msg
    assert db.read_bytes() == bytes(data)  # not rebuilt, not emptied


def test_a_file_that_is_not_a_database_is_refused_not_replaced(tmp_path: Path) -> None:
    db = tmp_path / "reviews.sqlite"
    db.write_text("decisions exported by hand\n" * 100)
    with pytest.raises(ReviewStoreError, match="is damaged"):
        ReviewStore(db)
    assert db.read_text().startswith("decisions exported by hand")
