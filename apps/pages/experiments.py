"""Experiments: each domain's MLflow runs side by side, the registered models, and promotion to champion."""

from __future__ import annotations

import tempfile

import pandas as pd
import streamlit as st

from loupe.apps import context as ctx

cfg = ctx.settings()
reviewer = ctx.reviewer()
st.title("Experiments")
try:
    tracker = ctx.tracker(cfg.tracking_uri)
    runs = tracker.runs()
except Exception as exc:  # noqa: BLE001 - a store that cannot be read is shown, not raised
    st.error(f"Cannot read the MLflow store ({cfg.tracking_uri or 'the default store'}): {exc}")
    st.stop()
st.caption(f"MLflow store: {tracker.uri}")
domains = sorted({r["tags"].get("domain") for r in runs if r["tags"].get("domain")})
if not runs:
    st.info("No runs yet. `loupe demo` or `loupe train CONFIG` records them.")
    st.stop()
domain = st.selectbox("Domain", ["all", *domains], key="exp-domain")
mine = [r for r in runs if domain == "all" or r["tags"].get("domain") == domain]
overview = pd.DataFrame(
    [
        {"run": r["name"], "experiment": r["experiment"], "status": r["status"],
         "started": pd.to_datetime(r["start_time"], unit="ms", utc=True).strftime("%Y-%m-%d %H:%M UTC"),
         "recipe": r["tags"].get("recipe", ""), "run_id": r["run_id"]}
        for r in mine
    ]
)  # fmt: skip
st.dataframe(overview, hide_index=True, width="stretch")

chosen = st.multiselect(
    "Compare runs",
    [r["run_id"] for r in mine],
    key="exp-compare",
    max_selections=6,
    format_func=lambda rid: next(f"{r['name']} ({rid[:8]})" for r in mine if r["run_id"] == rid),
)
if chosen:
    picked = [r for r in mine if r["run_id"] in chosen]
    metrics = pd.DataFrame({f"{r['name']} ({r['run_id'][:8]})": r["metrics"] for r in picked})
    st.subheader("Metrics")
    st.dataframe(metrics, width="stretch")
    params = pd.DataFrame({f"{r['name']} ({r['run_id'][:8]})": r["params"] for r in picked})
    differ = params[params.nunique(axis=1, dropna=False) > 1] if len(picked) > 1 else params
    with st.expander(f"Config ({len(differ)} settings {'differ' if len(picked) > 1 else 'logged'})"):
        st.dataframe(differ.astype(str), width="stretch")
    st.subheader("Plots")
    with tempfile.TemporaryDirectory(prefix="loupe-dashboard-") as tmp:
        cols = st.columns(len(picked))
        for col, r in zip(cols, picked, strict=True):
            col.caption(r["name"])
            images = [p for p in tracker.artifacts(r["run_id"]) if p.lower().endswith(".png")][:6]
            for p in images:
                col.image(str(tracker.download(r["run_id"], p, tmp)), caption=p)
            if not images:
                col.write("no plots logged")

st.subheader("Registered models")
models = tracker.registered_models()
if not models:
    st.info("No registered models.")
    st.stop()
st.dataframe(pd.DataFrame([{**m, "aliases": ", ".join(f"@{a}" for a in m["aliases"])} for m in models]),
             hide_index=True, width="stretch")  # fmt: skip
with st.expander("Promote a version", expanded=False):
    name = st.selectbox("Model", sorted({m["name"] for m in models}), key="exp-promote-name")
    versions = [m["version"] for m in models if m["name"] == name]
    version = st.selectbox("Version", versions, key="exp-promote-version")
    alias = st.text_input("Alias", "champion", key="exp-promote-alias")
    reason = st.text_area("Reason (logged with the promotion)", key="exp-promote-reason")
    sure = st.checkbox(f"I confirm: {name} v{version} becomes @{alias}", key="exp-promote-confirm")
    if st.button("Promote", type="primary", key="exp-promote", disabled=not sure):
        try:
            record = tracker.promote(name, version, alias, reason, reviewer)
            st.success(f"{name}@{alias} → v{version} (was v{record['previous_version']}), by {record['by']}")
            ctx.tables.clear()
        except Exception as exc:  # noqa: BLE001 - the store's refusal is shown to the user
            st.error(str(exc))
