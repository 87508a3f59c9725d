"""Every page of the dashboard driven through Streamlit's AppTest, over a real scoring run and MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from loupe.workflows.review.store import ReviewStore

APP = Path(__file__).resolve().parents[2] / "apps" / "dashboard.py"


def _app(reviewer: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    if reviewer:
        at.session_state["reviewer_name"] = reviewer
    return at.run()


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_queue_counts_filters_and_sorts(dashboard: tuple[Path, str]) -> None:
    at = _app()
    _no_errors(at)
    assert at.title[0].value == "Review queue"
    assert _metrics(at) == {"pending": "3", "reviewed": "0", "disagreed": "0", "partly reviewed": "0",
                            "not scored": "2"}  # fmt: skip
    table = at.dataframe[0].value
    assert sorted(table["path"]) == ["RG1_UNCR.dcm", "RG3_UNCR.dcm", "film.png"]  # not-scored rows filtered out
    assert table["uncertainty"].is_monotonic_increasing  # default: closest to the threshold first

    at.selectbox(key="queue-sort").set_value("score (highest first)").run()
    assert at.dataframe[0].value["score"].is_monotonic_decreasing
    at.multiselect(key="queue-state").set_value(["not scored"]).run()
    assert sorted(at.dataframe[0].value["path"]) == ["CT_small.dcm", "truncated.dcm"]
    at.multiselect(key="queue-state").set_value(["pending"]).run()
    at.selectbox(key="queue-finding").set_value("Effusion").run()
    effusion = at.dataframe[0].value
    assert set(effusion["top finding"]) == {"Effusion"} and effusion["score"].is_monotonic_decreasing
    at.slider(key="queue-score").set_value((0.99, 1.0)).run()
    assert (at.dataframe[0].value["score"] >= 0.99).all()


def test_a_decision_is_recorded_and_read_back_after_a_restart(dashboard: tuple[Path, str]) -> None:
    data, _ = dashboard
    at = _app("alice")
    at.button(key="queue-open").click().run()
    _no_errors(at)
    assert at.title[0].value.startswith("Case 1 of 3")
    radio = next(r for r in at.radio if r.label.startswith("Pneumonia"))
    radio.set_value("reject").run()
    next(b for b in at.button if b.label == "Record").click().run()
    _no_errors(at)
    assert any("Recorded 1 decision" in s.value for s in at.success)
    store = ReviewStore(data / "reviews.sqlite")
    (action,) = store.actions("cxr")
    assert (action.reviewer, action.finding, action.action, action.model_name) == ("alice", "Pneumonia", "reject",
                                                                                  "cxr-tiny")  # fmt: skip

    restarted = _app("alice")  # a new session on the same data folder: the decision is there
    assert _metrics(restarted)["partly reviewed"] == "1" and _metrics(restarted)["pending"] == "2"
    restarted.button(key="queue-open").click().run()
    findings = restarted.dataframe[0].value.set_index("finding")
    assert findings.loc["Pneumonia", "reviewers"].startswith("alice: ")


def test_a_conflicting_second_decision_is_surfaced_and_must_be_confirmed(dashboard: tuple[Path, str]) -> None:
    data, _ = dashboard
    first = _app("alice")
    first.button(key="queue-open").click().run()
    next(r for r in first.radio if r.label.startswith("Effusion")).set_value("accept").run()
    next(b for b in first.button if b.label == "Record").click().run()
    _no_errors(first)

    at = _app("bob")
    at.button(key="queue-open").click().run()
    next(r for r in at.radio if r.label.startswith("Effusion")).set_value("reject").run()
    next(b for b in at.button if b.label == "Record").click().run()
    _no_errors(at)
    (warning,) = [w.value for w in at.warning if "alice" in w.value]
    assert "you say" in warning and "confirm the disagreement" in warning
    store = ReviewStore(data / "reviews.sqlite")
    assert [a.reviewer for a in store.actions("cxr")] == ["alice"]  # bob's contradiction is not written yet
    at.checkbox(key=next(c.key for c in at.checkbox if "confirm my disagreement" in c.label)).check().run()
    next(r for r in at.radio if r.label.startswith("Effusion")).set_value("reject").run()
    next(b for b in at.button if b.label == "Record").click().run()
    _no_errors(at)
    assert [a.reviewer for a in store.actions("cxr")] == ["alice", "bob"]
    assert store.actions("cxr")[1].confirmed_disagreement
    assert _metrics(_app("carol"))["disagreed"] == "1"


def test_agreement_page_and_the_export(dashboard: tuple[Path, str]) -> None:
    data, _ = dashboard
    at = _app("alice")
    at.button(key="queue-open").click().run()
    for r in at.radio:
        r.set_value("accept")
    at.run()
    next(b for b in at.button if b.label == "Record").click().run()
    at.switch_page("pages/reviews.py").run()
    _no_errors(at)
    table = at.dataframe[0].value
    row = table.set_index(["rater_a", "rater_b"]).loc[("model", "alice")]
    assert row["n"] == 2 and row["agreement"] == 1.0
    at.button(key="reviews-export").click().run()
    _no_errors(at)
    (out,) = list((data / "exports").glob("reviewed-cxr-*.csv"))
    assert out.read_text().count("\n") == 2  # the header and the one reviewed case


def test_experiments_page_compares_runs_and_promotes_with_a_reason(dashboard: tuple[Path, str]) -> None:
    _, uri = dashboard
    at = _app("alice")
    at.switch_page("pages/experiments.py").run()
    _no_errors(at)
    runs = at.dataframe[0].value
    assert {"train-cxr-tiny", "train-cxr-tiny-2", "score-cxr"} <= set(runs["run"])
    ids = [r for r in at.multiselect(key="exp-compare").options]
    at.multiselect(key="exp-compare").set_value(ids[:2]).run()
    _no_errors(at)
    at.selectbox(key="exp-promote-version").set_value("2").run()
    at.text_area(key="exp-promote-reason").input("better validation AUROC (0.84 vs 0.81)").run()
    assert at.button(key="exp-promote").disabled  # not before the confirmation
    at.checkbox(key="exp-promote-confirm").check().run()
    at.button(key="exp-promote").click().run()
    _no_errors(at)
    assert any("cxr-tiny@champion → v2 (was v1)" in s.value for s in at.success)
    from loupe.core.tracking import MlflowTracker

    tracker = MlflowTracker(uri)
    assert tracker.model_version("models:/cxr-tiny@champion") == ("cxr-tiny", "2")
    assert "better validation AUROC" in tracker.version_tags("cxr-tiny", "2")["loupe.promotion.champion"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("notes.txt", b"just text, not an image" * 10, "not a DICOM, PNG, JPEG or TIFF"),
     ("film.dcm", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI", "could not be scored")],
)  # fmt: skip
def test_an_upload_that_is_not_an_image_or_is_corrupt_shows_the_error(
    dashboard: tuple[Path, str], name: str, content: bytes, message: str
) -> None:
    data, _ = dashboard
    at = _app("alice")
    at.switch_page("pages/upload.py").run()
    _no_errors(at)
    at.file_uploader(key="upload-file").set_value((name, content, "application/octet-stream")).run()
    _no_errors(at)
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    for stored in (data / "uploads").rglob("*") if (data / "uploads").exists() else []:
        assert data in stored.parents  # never written outside the data folder


def test_an_upload_of_a_real_film_is_scored_by_the_champion(dashboard: tuple[Path, str]) -> None:
    from pydicom.data import get_testdata_file

    from loupe.core.tracking import MlflowTracker

    # the store is shared by the module's tests (the promotion test moves @champion): ask it which version serves
    _, version = MlflowTracker(dashboard[1]).model_version("models:/cxr-tiny@champion")
    at = _app("alice")
    at.switch_page("pages/upload.py").run()
    film = Path(get_testdata_file("RG1_UNCR.dcm", download=False)).read_bytes()
    at.file_uploader(key="upload-file").set_value(("Jane_Doe_chest.dcm", film, "application/dicom")).run()
    _no_errors(at)
    assert any(f"scored with models:/cxr-tiny/{version}" in s.value for s in at.success)  # the champion's version
    assert at.dataframe[0].value.set_index("finding").loc["Pneumonia", "threshold"] == 0.3


def test_the_case_page_without_a_case_points_to_the_queue(dashboard: tuple[Path, str]) -> None:
    at = _app()
    at.switch_page("pages/case.py").run()
    _no_errors(at)
    assert any("Pick a case in the review queue" in i.value for i in at.info)


def test_a_tiled_domain_with_a_mask_shows_through_the_same_pages(dashboard: tuple[Path, str], tmp_path: Path) -> None:
    """No domain-specific code in apps/: the test suite's own tiled domain (tests/plugins) is reviewed the same way."""
    import sys

    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import loupe_testunits as tu

    from loupe.core.models import build_model, save_model
    from loupe.workflows.scoring import ScoreOptions, score

    data, _ = dashboard
    torch.manual_seed(0)
    model, _ = build_model(tu.mask_spec())
    folder = save_model(model.eval(), tu.mask_spec(), tmp_path / "tiles-model")
    inputs = tmp_path / "tiles"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)).save(inputs / "t.png")
    score(ScoreOptions(domain=tu.NAME, input=inputs, model=f"local-dir:{folder}", out=data / "tiles" / "p.parquet",
                       track=False, num_workers=0))  # fmt: skip
    at = _app("alice")
    at.selectbox(key="queue-domain").set_value(tu.NAME).run()
    _no_errors(at)
    assert list(at.dataframe[0].value["path"]) == ["t.png"]
    at.button(key="queue-open").click().run()
    _no_errors(at)
    overlays = next(m for m in at.multiselect if m.label == "Overlays")
    assert {"mask", "units: Lesion", "units: Artefact"} <= set(overlays.options)
    overlays.set_value(["mask", "units: Lesion"]).run()
    _no_errors(at)
    assert len(at.get("image")) == 1  # the tile with its mask and grid drawn over it
