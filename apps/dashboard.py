"""The Loupe review dashboard (``loupe dashboard``): the queue, the case view, agreement and export, experiments
and uploads, over the predictions tables under the data folder and the MLflow store."""

from __future__ import annotations

import streamlit as st

from loupe.apps import context as ctx

st.set_page_config(page_title="Loupe review", page_icon=":material/search:", layout="wide")
cfg = ctx.settings()
pages = [
    st.Page("pages/queue.py", title="Review queue", icon=":material/checklist:", default=True),
    st.Page("pages/case.py", title="Case", icon=":material/image_search:"),
    st.Page("pages/reviews.py", title="Agreement and export", icon=":material/handshake:"),
    st.Page("pages/experiments.py", title="Experiments", icon=":material/science:"),
    st.Page("pages/upload.py", title="Upload", icon=":material/upload_file:"),
]
ctx.ask_reviewer()
st.sidebar.caption(f"Data: {cfg.data}")
st.navigation(pages).run()
