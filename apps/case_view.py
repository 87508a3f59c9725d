"""One review case on screen — the image with its overlays, the findings and the reviewer's decisions — for any
domain, from the review-case contract alone (`loupe.core.review`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from loupe.apps import context as ctx
from loupe.apps.render import View, compose
from loupe.core.errors import LoupeError
from loupe.core.review import ReviewCase
from loupe.workflows.review.store import ABSENT, PRESENT, CaseRef, Disagreement, ReviewStore, model_value

NO_CHANGE = "—"
DISPLAY_SIDE = 1024


def case_ref(case: ReviewCase) -> CaseRef:
    m = case.model
    return CaseRef(case.domain, case.case_id, case.path, m.get("model_name"), m.get("model_version"),
                   m.get("weights_sha256"))  # fmt: skip


def show_identity(case: ReviewCase) -> None:
    m = case.model
    st.caption(
        f"**{case.path}** · model **{m.get('model_name', '?')}** v{m.get('model_version', '?')} "
        f"(weights {str(m.get('weights_sha256', ''))[:12]}…, aggregation {m.get('aggregation', '?')}) · "
        f"input {case.case_id[:23]}…"
    )
    if case.status != "ok":
        st.error(f"Not scored: {case.status.removeprefix('failed: ')}")


def show_image(case: ReviewCase, key: str) -> None:
    """The base layer with window/level (films), overlay toggles, opacity and zoom."""
    if not case.layers:
        return
    layer = case.layers[0]
    if not Path(layer.source).is_file():
        st.warning(f"The input file is no longer at {layer.source}; the scores stay in the table.")
        return
    names = [o.name for o in case.overlays]
    with st.expander("View", expanded=True):
        c1, c2, c3 = st.columns(3)
        window = None
        if layer.kind == "film":
            level0, width0 = layer.window or (0.5, 1.0)
            level = c1.slider("Level", 0.0, 1.0, float(level0), 0.01, key=f"{key}-level")
            width = c1.slider("Window", 0.05, 1.0, float(width0), 0.01, key=f"{key}-width")
            window = (level, width)
        shown = c2.multiselect("Overlays", names, default=[o.name for o in case.overlays if o.visible],
                               key=f"{key}-overlays")  # fmt: skip
        opacity = c2.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"{key}-opacity")
        zoom = c3.slider("Zoom", 1.0, 4.0, 1.0, 0.5, key=f"{key}-zoom")
        center = (0.5, 0.5)
        if zoom > 1:
            center = (c3.slider("Across", 0.0, 1.0, 0.5, 0.05, key=f"{key}-cx"),
                      c3.slider("Down", 0.0, 1.0, 0.5, 0.05, key=f"{key}-cy"))  # fmt: skip
    try:
        base = ctx.layer_pixels(layer.source, int(DISPLAY_SIDE * zoom), ctx.mtime(layer.source))
        overlays = [(o, ctx.overlay_values(o.path, ctx.mtime(o.path)) if o.path else None) for o in case.overlays]
    except LoupeError as exc:
        st.info(f"The file cannot be shown: {exc}")
        return
    img = compose(base, layer, overlays, View(window, tuple(shown), opacity, zoom, center))
    st.image(img, caption=f"{layer.kind} · display copy {img.shape[1]}x{img.shape[0]} of "
             f"{(layer.frame or {}).get('width', '?')}x{(layer.frame or {}).get('height', '?')} px")  # fmt: skip


def show_timeline(case: ReviewCase) -> None:
    if case.timeline:
        frame = pd.DataFrame(case.timeline)
        st.line_chart(frame, x="time_s", y="score", height=180)


def show_metadata(case: ReviewCase) -> None:
    if case.metadata:
        with st.expander("Metadata (non-identifying)"):
            rows = [{"field": k, "value": _text(v)} for k, v in case.metadata.items()]
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def _text(v) -> str:
    return v if isinstance(v, str) else str(v)


def decisions_panel(case: ReviewCase, store: ReviewStore, reviewer: str, key: str) -> None:
    """The findings with the model's scores and stored thresholds, everyone's current decisions, and the
    reviewer's own: accept / reject / relabel each finding, a comment, claim or release the case."""
    if not case.findings:
        st.info("No findings to review: the model did not score this input.")
        return
    ref = case_ref(case)
    if done := st.session_state.pop(f"{key}-done", None):
        st.success(done)
    decided = {f: v for (cid, f), v in store.decisions(case.domain).items() if cid == case.case_id}
    rows = [{"finding": f.label, "score": f.score, "threshold": f.threshold,
             "model says": model_value(f.decision), "reviewers": _votes(decided.get(f.label, {}))}
            for f in case.findings]  # fmt: skip
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={"score": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.3f"),
                                "threshold": st.column_config.NumberColumn(format="%.3f")})  # fmt: skip
    labels = [f.label for f in case.findings]
    v = st.session_state.setdefault(f"{key}-form", 0)  # a new form (fresh widgets) after each recorded decision
    key = f"{key}-{v}"
    choices = {}
    for f in case.findings:
        c1, c2 = st.columns([3, 2])
        choices[f.label] = c1.radio(f"{f.label} (model: {model_value(f.decision)})",
                                    [NO_CHANGE, "accept", "reject", "relabel"], horizontal=True,
                                    key=f"{key}-choice-{f.label}")  # fmt: skip
        if choices[f.label] == "relabel":
            c2.selectbox("new value", [PRESENT, ABSENT, *[lb for lb in labels if lb != f.label]],
                         key=f"{key}-value-{f.label}")  # fmt: skip
    comment = st.text_area("Comment", key=f"{key}-comment", placeholder="what you saw, why you disagree")
    pending = st.session_state.get(f"{key}-disagreements", {})
    confirmed = {}
    for finding, message in pending.items():
        st.warning(message)
        confirmed[finding] = st.checkbox(f"I confirm my disagreement on {finding}", key=f"{key}-confirm-{finding}")
    b1, b2, b3 = st.columns(3)
    if b1.button("Record", type="primary", key=f"{key}-record", help="Write your decisions to the review store"):
        _record(case, ref, store, reviewer, choices, comment, confirmed, key)
    claims = store.claims(case.domain)
    holder = claims.get(case.case_id)
    if holder != reviewer and b2.button("Claim", key=f"{key}-claim", help="Mark the case as yours to review"):
        _note(store, reviewer, ref, "claim")
    if holder == reviewer and b2.button("Release", key=f"{key}-release"):
        _note(store, reviewer, ref, "release")
    if holder:
        b3.caption(f"claimed by {holder}")


def _votes(votes: dict[str, str]) -> str:
    return ", ".join(f"{r}: {v}" for r, v in sorted(votes.items())) or "—"


def _record(case, ref, store, reviewer, choices, comment, confirmed, key) -> None:
    if not reviewer:
        st.error("Enter your name as reviewer (in the sidebar) before recording a decision.")
        return
    done, disagreements = 0, {}
    for f in case.findings:
        action = choices[f.label]
        if action == NO_CHANGE:
            continue
        value = st.session_state.get(f"{key}-value-{f.label}") if action == "relabel" else None
        try:
            store.decide(reviewer, ref, f.label, action, model_value(f.decision), value, comment or None,
                         confirm_disagreement=confirmed.get(f.label, False))  # fmt: skip
            done += 1
        except Disagreement as exc:
            disagreements[f.label] = str(exc)
        except LoupeError as exc:
            st.error(str(exc))
    if comment and not done and not disagreements:
        store.note(reviewer, ref, "comment", comment)
        done = 1
    st.session_state[f"{key}-disagreements"] = disagreements
    if done:
        base = key.rsplit("-", 1)[0]
        st.session_state[f"{base}-done"] = f"Recorded {done} decision(s) for {case.path}."
        if not disagreements:
            st.session_state[f"{base}-form"] = st.session_state.get(f"{base}-form", 0) + 1
    if done or disagreements:
        st.rerun()  # show the table with the new decisions, or the other reviewers' ones and the confirmations


def _note(store, reviewer, ref, action) -> None:
    try:
        store.note(reviewer, ref, action)
        st.rerun()
    except LoupeError as exc:
        st.error(str(exc))


def history(case: ReviewCase, store: ReviewStore) -> None:
    actions = store.actions(case.domain, case.case_id)
    if actions:
        with st.expander(f"History ({len(actions)} actions, oldest first)"):
            st.dataframe(pd.DataFrame([{"at": a.at, "reviewer": a.reviewer, "finding": a.finding, "action": a.action,
                                        "before": a.previous, "after": a.value, "comment": a.comment,
                                        "model version": a.model_version} for a in actions]),
                         hide_index=True, width="stretch")  # fmt: skip


def show_case(case: ReviewCase, store: ReviewStore, reviewer: str, key: str, decide: bool = True) -> None:
    show_identity(case)
    left, right = st.columns([1, 1])
    with left:
        show_image(case, key)
        show_timeline(case)
    with right:
        if decide:
            decisions_panel(case, store, reviewer, key)
        show_metadata(case)
        history(case, store)
