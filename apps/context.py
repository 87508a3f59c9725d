"""What every page of the dashboard shares: its settings, the cached tables and cases, the review store, the
tracker, the reviewer's name and the case being looked at.

Settings come from the command line after ``--`` (``loupe dashboard`` passes ``--data`` and ``--tracking-uri``),
else from ``LOUPE_DASHBOARD_DATA`` / ``MLFLOW_TRACKING_URI``; the data folder defaults to ``./loupe-demo`` (where
``loupe demo`` writes) when it exists, else the current folder. Tables are cached per (path, modification time):
a rescored table is read again, a page switch is not a reread.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from loupe.core.review import Layer, ReviewCase, load_overlay, render_layer
from loupe.workflows.review import TableInfo, find_tables, review_cases
from loupe.workflows.review.store import ReviewStore

STORE_NAME = "reviews.sqlite"


@dataclass(frozen=True)
class Settings:
    data: Path
    tracking_uri: str | None

    @property
    def store_path(self) -> Path:
        return self.data / STORE_NAME


def settings() -> Settings:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data")
    parser.add_argument("--tracking-uri")
    args, _ = parser.parse_known_args(sys.argv[1:])
    data = args.data or os.environ.get("LOUPE_DASHBOARD_DATA")
    if not data:
        data = "loupe-demo" if Path("loupe-demo").is_dir() else "."
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    return Settings(Path(data).expanduser().resolve(), uri)


@st.cache_resource
def store(path: str) -> ReviewStore:
    return ReviewStore(path)


@st.cache_resource
def tracker(uri: str | None):
    from loupe.core.tracking import make_tracker

    return make_tracker(uri)


@st.cache_resource(show_spinner="loading the model", max_entries=4)
def model(ref: str, domain: str, uri: str | None):
    """A model resolved once per (reference, domain, store) and kept for every session (uploads score with it)."""
    from loupe.workflows.scoring import resolve_model

    return resolve_model(ref, domain, tracker(uri))


@st.cache_data(ttl=30, show_spinner=False)
def tables(data: str) -> list[TableInfo]:
    return find_tables(data)


@st.cache_data(show_spinner="reading the predictions table")
def cases(path: str, mtime: float) -> list[ReviewCase]:
    return list(review_cases(path))


@st.cache_data(show_spinner=False, max_entries=64)
def layer_pixels(source: str, max_side: int, mtime: float):
    """The display copy of a layer's file (downsampled to ``max_side``; the file itself is never touched)."""
    return render_layer(Layer("", "", source), max_side=max_side)


@st.cache_data(show_spinner=False, max_entries=256)
def overlay_values(path: str, mtime: float):
    from loupe.core.review import Overlay

    return load_overlay(Overlay("", "map", {}, path))


def mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


REVIEWER = "reviewer_name"  # kept outside the widget's own state: Streamlit drops widget state on a page switch


def _keep_reviewer() -> None:
    st.session_state[REVIEWER] = st.session_state["reviewer_input"].strip()


def ask_reviewer() -> None:
    """The reviewer's name, asked in the sidebar by the entry page, kept for the session across pages."""
    st.session_state.setdefault(REVIEWER, "")
    st.session_state["reviewer_input"] = st.session_state[REVIEWER]
    st.sidebar.text_input("Reviewer", key="reviewer_input", placeholder="your name", on_change=_keep_reviewer,
                          help="Recorded with every decision, claim and comment.")  # fmt: skip


def reviewer() -> str:
    return str(st.session_state.get(REVIEWER) or "").strip()


def open_case(table: str, case_id: str) -> None:
    st.session_state["case"] = {"table": table, "case_id": case_id}


def current_case() -> tuple[str, ReviewCase] | None:
    ref = st.session_state.get("case")
    if not ref:
        return None
    found = [c for c in cases(ref["table"], mtime(ref["table"])) if c.case_id == ref["case_id"]]
    return (ref["table"], found[0]) if found else None
