"""Case view: the image with its overlays, the findings with the model's thresholds, and the decisions."""

from __future__ import annotations

import streamlit as st

from loupe.apps import context as ctx
from loupe.apps.case_view import show_case

cfg = ctx.settings()
reviewer = ctx.reviewer()
store = ctx.store(str(cfg.store_path))
found = ctx.current_case()
if found is None:
    st.title("Case")
    st.info("Pick a case in the review queue.")
    if st.button("Go to the queue", key="case-to-queue"):
        st.switch_page("pages/queue.py")
    st.stop()
table, case = found
queue = st.session_state.get("queue", {})
ids = queue.get("ids", []) if queue.get("table") == table else []
st.title(f"Case {ids.index(case.case_id) + 1} of {len(ids)}" if case.case_id in ids else "Case")
prev_, next_, back = st.columns(3)
if case.case_id in ids:
    i = ids.index(case.case_id)
    if i > 0 and prev_.button("◀ Previous", key="case-prev"):
        ctx.open_case(table, ids[i - 1])
        st.rerun()
    if i + 1 < len(ids) and next_.button("Next ▶", key="case-next"):
        ctx.open_case(table, ids[i + 1])
        st.rerun()
if back.button("Back to the queue", key="case-back"):
    st.switch_page("pages/queue.py")
show_case(case, store, reviewer, key=f"case-{case.case_id[:20]}")
