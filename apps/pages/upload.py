"""Upload: score one DICOM, image, slide or clip with the domain's champion model, ad hoc, and see its case."""

from __future__ import annotations

import streamlit as st

from loupe.apps import context as ctx
from loupe.apps.case_view import show_case
from loupe.core.errors import LoupeError
from loupe.core.registry import DOMAINS, discover_domains
from loupe.workflows.review.uploads import MAX_UPLOAD_BYTES, champion, score_upload, store_upload

cfg = ctx.settings()
reviewer = ctx.reviewer()
store = ctx.store(str(cfg.store_path))
st.title("Score an upload")
discover_domains()
domain = st.selectbox("Domain", DOMAINS.names(), key="upload-domain")
extra = ", ".join(sorted(DOMAINS.get(domain).input_suffixes))
st.caption(f"DICOM, PNG, JPEG or TIFF{f' (or {extra})' if extra else ''}, up to {MAX_UPLOAD_BYTES // 2**20} MiB. "
           f"Stored in {cfg.data / 'uploads'} under a name made from its content; scored with the domain's "
           "@champion model.")  # fmt: skip
upload = st.file_uploader("File", key="upload-file")
if upload is not None:
    try:
        stored = store_upload(cfg.data, upload.name, upload.getvalue(), suffixes=DOMAINS.get(domain).input_suffixes)
        with st.spinner("scoring"):
            tracker = ctx.tracker(cfg.tracking_uri)
            name, version = tracker.model_version(champion(domain, tracker))
            model = f"models:/{name}/{version}"  # pinned: a later promotion must not be served from the cache
            case = score_upload(stored, domain, model, tracker.uri, resolved=ctx.model(model, domain, cfg.tracking_uri))
    except LoupeError as exc:
        st.error(str(exc))
        st.stop()
    if case.status != "ok":
        st.error(f"{upload.name} could not be scored: {case.status.removeprefix('failed: ')}")
        st.stop()
    st.success(f"{upload.name} scored with {model}")
    show_case(case, store, reviewer, key=f"upload-{stored.sha256[:12]}")
