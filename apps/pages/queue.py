"""Review queue: one domain's cases, filtered and sorted by score, uncertainty, finding, state and reviewer."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from loupe.apps import context as ctx
from loupe.workflows.review.store import summarise

cfg = ctx.settings()
reviewer = ctx.reviewer()
store = ctx.store(str(cfg.store_path))
st.title("Review queue")
tables = ctx.tables(str(cfg.data))
if not tables:
    st.info(f"No predictions tables under {cfg.data}. Run `loupe demo`, or `loupe score DOMAIN --input ... --out "
            f"{cfg.data}/predictions.parquet`, then reload.")  # fmt: skip
    st.stop()

domains = sorted({d for t in tables for d in t.domains})
domain = st.selectbox("Domain", domains, key="queue-domain")
mine = [t for t in tables if domain in t.domains]
table = st.selectbox("Predictions table", [str(t.path) for t in mine], key="queue-table",
                     format_func=lambda p: f"{p} ({next(t.rows for t in mine if str(t.path) == p)} rows)")  # fmt: skip
cases = [c for c in ctx.cases(table, ctx.mtime(table)) if c.domain == domain]
decided = store.decisions(domain)
claims = store.claims(domain)

rows = []
for c in cases:
    votes = {f.label: decided.get((c.case_id, f.label), {}) for f in c.findings}
    top = max(c.findings, key=lambda f: f.score or 0.0) if c.findings else None
    margins = [f.margin for f in c.findings if f.margin is not None]
    rows.append({
        "case_id": c.case_id, "path": c.path, "status": "ok" if c.status == "ok" else "failed",
        "top finding": top.label if top else None, "score": top.score if top else None,
        "threshold": top.threshold if top else None, "decision": bool(top.decision) if top else None,
        "uncertainty": min(margins) if margins else None,
        "state": summarise(votes, votes) if c.findings else "not scored",
        "reviewers": ", ".join(sorted({r for v in votes.values() for r in v})), "claimed by": claims.get(c.case_id, ""),
    })  # fmt: skip
frame = pd.DataFrame(rows)

states = ["pending", "partial", "reviewed", "disagreed", "not scored"]
c1, c2, c3, c4, c5 = st.columns(5)
c1.metric("pending", int((frame.state == "pending").sum()))
c2.metric("reviewed", int((frame.state == "reviewed").sum()))
c3.metric("disagreed", int((frame.state == "disagreed").sum()))
c4.metric("partly reviewed", int((frame.state == "partial").sum()))
c5.metric("not scored", int((frame.state == "not scored").sum()))

with st.expander("Filter and sort", expanded=True):
    f1, f2, f3 = st.columns(3)
    labels = sorted({f.label for c in cases for f in c.findings})
    finding = f1.selectbox("Finding", ["any", *labels], key="queue-finding")
    state = f2.multiselect("State", states, default=["pending", "partial", "disagreed"], key="queue-state")
    who = f3.selectbox("Reviewer", ["anyone", *sorted({r for v in decided.values() for r in v})], key="queue-who")
    g1, g2, g3 = st.columns(3)
    lo, hi = g1.slider("Score", 0.0, 1.0, (0.0, 1.0), 0.01, key="queue-score")
    sort = g2.selectbox("Sort by", ["uncertainty (closest to threshold first)", "score (highest first)", "path"],
                        key="queue-sort")  # fmt: skip
    only_mine = g3.checkbox("Only cases I claimed", key="queue-mine")

view = frame
if finding != "any":
    scores = {c.case_id: next((f.score for f in c.findings if f.label == finding), None) for c in cases}
    view = view.assign(
        score=view.case_id.map(scores),
        threshold=view.case_id.map(
            {c.case_id: next((f.threshold for f in c.findings if f.label == finding), None) for c in cases}
        ),
    )
    view = view.assign(uncertainty=(view.score - view.threshold).abs(), **{"top finding": finding})
view = view[view.state.isin(state)] if state else view
if who != "anyone":
    view = view[view.reviewers.str.contains(who, regex=False)]
if only_mine:
    view = view[view["claimed by"] == reviewer]
scored = view.score.notna()
view = view[~scored | ((view.score >= lo) & (view.score <= hi))]
key = {"score (highest first)": ("score", False), "path": ("path", True)}.get(sort, ("uncertainty", True))
view = view.sort_values(key[0], ascending=key[1], na_position="last")
st.session_state["queue"] = {"table": table, "ids": view.case_id.tolist()}

st.dataframe(
    view.drop(columns=["case_id"]),
    hide_index=True,
    width="stretch",
    column_config={"score": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.3f")},
)
if view.empty:
    st.info("No case matches these filters.")
    st.stop()
pick = st.selectbox("Case", view.case_id.tolist(), key="queue-pick",
                    format_func=lambda cid: view.set_index("case_id").loc[cid, "path"])  # fmt: skip
b1, b2 = st.columns(2)
if b1.button("Open case", type="primary", key="queue-open"):
    ctx.open_case(table, pick)
    st.switch_page("pages/case.py")
if b2.button("Claim case", key="queue-claim"):
    from loupe.apps.case_view import case_ref

    case = next(c for c in cases if c.case_id == pick)
    try:
        store.note(reviewer, case_ref(case), "claim")
        st.rerun()
    except Exception as exc:  # noqa: BLE001 - shown to the reviewer
        st.error(str(exc))
