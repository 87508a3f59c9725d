"""Agreement (model vs reviewers, reviewer vs reviewer, Cohen's κ) and the export of reviewed cases."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from loupe.apps import context as ctx
from loupe.workflows.review.agreement import agreement_table, export_manifest, reviewed_manifest

cfg = ctx.settings()
store = ctx.store(str(cfg.store_path))
st.title("Agreement and export")
tables = ctx.tables(str(cfg.data))
if not tables:
    st.info(f"No predictions tables under {cfg.data}.")
    st.stop()
domains = sorted({d for t in tables for d in t.domains})
domain = st.selectbox("Domain", domains, key="reviews-domain")
cases = [c for t in tables if domain in t.domains for c in ctx.cases(str(t.path), t.mtime) if c.domain == domain]
table = agreement_table(cases, store)
st.subheader("Agreement")
if table.empty:
    st.info("No decisions recorded yet for this domain.")
else:
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"agreement": st.column_config.NumberColumn(format="%.2f"),
                                "kappa": st.column_config.NumberColumn("Cohen's κ", format="%.2f")})  # fmt: skip
    st.caption("κ is empty where it is undefined (one value on every finding both raters judged).")

st.subheader("Reviewed cases as a manifest")
manifest = reviewed_manifest(cases, store)
st.write(f"{len(manifest)} reviewed cases; labels are 1 / 0 where the reviewers agree, empty where they disagree "
         f"or did not decide (masked in the loss). Train on it with `data.manifest=...`.")  # fmt: skip
if not manifest.empty:
    st.dataframe(manifest.drop(columns=["path"]), hide_index=True, width="stretch")
    if st.button("Export manifest", key="reviews-export"):
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = export_manifest(cases, store, cfg.data / "exports" / f"reviewed-{domain}-{stamp}.csv")
        st.success(f"Wrote {out}")
        st.download_button("Download it", out.read_bytes(), file_name=out.name, mime="text/csv",
                           key="reviews-download")  # fmt: skip
