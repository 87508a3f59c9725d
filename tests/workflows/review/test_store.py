"""The review store: append-only, durable, and two reviewers never overwrite each other."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from loupe.workflows.review.store import CaseRef, Disagreement, ReviewStore, ReviewStoreError, summarise

CASE = CaseRef("cxr", "sha256:abc", "films/a.dcm", "cxr-vit", "3", "w" * 64)


def test_decisions_are_recorded_with_who_what_before_after_and_the_model(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite")
    a = store.decide("alice", CASE, "Effusion", "reject", model_value="present", comment="no effusion")
    assert (a.reviewer, a.finding, a.action, a.previous, a.value) == (
        "alice",
        "Effusion",
        "reject",
        "present",
        "absent",
    )
    assert (a.model_name, a.model_version, a.content_id, a.comment) == ("cxr-vit", "3", "sha256:abc", "no effusion")
    b = store.decide("alice", CASE, "Effusion", "accept", model_value="present")  # she changes her mind: a new row
    assert b.previous == "absent" and b.value == "present" and b.id > a.id
    assert store.decisions("cxr") == {("sha256:abc", "Effusion"): {"alice": "present"}}
    assert [x.action for x in store.actions("cxr", "sha256:abc")] == ["reject", "accept"]


def test_nothing_is_lost_after_a_restart_and_rows_cannot_be_changed(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    ReviewStore(path).decide("alice", CASE, "Mass", "relabel", model_value="absent", value="present")
    again = ReviewStore(path)  # a new process, a reload
    assert again.decisions("cxr") == {("sha256:abc", "Mass"): {"alice": "present"}}
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE actions SET value = 'absent'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM actions")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_contradicting_second_reviewer_must_confirm(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite")
    store.decide("alice", CASE, "Effusion", "accept", model_value="present")
    with pytest.raises(Disagreement, match="you say absent, but alice: present") as err:
        store.decide("bob", CASE, "Effusion", "reject", model_value="present")
    assert err.value.others == {"alice": "present"}
    assert store.decisions("cxr")[("sha256:abc", "Effusion")] == {"alice": "present"}  # nothing written
    row = store.decide("bob", CASE, "Effusion", "reject", model_value="present", confirm_disagreement=True)
    assert row.confirmed_disagreement
    votes = store.decisions("cxr")[("sha256:abc", "Effusion")]
    assert votes == {"alice": "present", "bob": "absent"}  # both kept
    assert summarise(["Effusion"], {"Effusion": votes}) == "disagreed"
    with pytest.raises(Disagreement) as err:  # siding with alice still contradicts bob, and only bob is named
        store.decide("carol", CASE, "Effusion", "accept", model_value="present")
    assert err.value.others == {"bob": "absent"}


def test_the_disagreement_check_sees_a_decision_made_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    store = ReviewStore(path)
    code = (
        "import sys; from loupe.workflows.review.store import ReviewStore, CaseRef\n"
        "ReviewStore(sys.argv[1]).decide('alice', CaseRef('cxr', 'sha256:abc'), 'Effusion', 'accept', 'present')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    with pytest.raises(Disagreement, match="alice: present"):
        store.decide("bob", CASE, "Effusion", "reject", model_value="present")


def test_claims_and_bad_actions(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "r.sqlite")
    store.note("alice", CASE, "claim")
    assert store.claims("cxr") == {"sha256:abc": "alice"}
    store.note("bob", CASE, "release")  # only the holder releases
    assert store.claims("cxr") == {"sha256:abc": "alice"}
    store.note("alice", CASE, "release")
    assert store.claims("cxr") == {}
    with pytest.raises(ReviewStoreError, match="enter your name"):
        store.decide("  ", CASE, "Mass", "accept", model_value="absent")
    with pytest.raises(ReviewStoreError, match="relabel needs the new value"):
        store.decide("alice", CASE, "Mass", "relabel", model_value="absent")
    with pytest.raises(ReviewStoreError, match="a comment needs some text"):
        store.note("alice", CASE, "comment", " ")


@pytest.mark.parametrize(
    ("votes", "state"),
    [({}, "pending"), ({"A": {"x": "present"}}, "partial"), ({"A": {"x": "p"}, "B": {"y": "p"}}, "reviewed")],
)
def test_case_states(votes: dict, state: str) -> None:
    assert summarise(["A", "B"], votes) == state
