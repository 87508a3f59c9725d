"""Agreement statistics and the export of reviewed cases as a training manifest."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from loupe.core.review import Finding, ReviewCase
from loupe.workflows.review.agreement import agreement_table, cohen_kappa, export_manifest, reviewed_manifest
from loupe.workflows.review.store import CaseRef, ReviewStore


def _case(i: int, effusion: bool) -> ReviewCase:
    return ReviewCase("cxr", f"sha256:{i}", f"f{i}.png", f"/data/f{i}.png", "ok", {"model_name": "m"},
                      findings=(Finding("Effusion", 0.8 if effusion else 0.2, 0.5, effusion),))  # fmt: skip


def test_cohen_kappa_known_values() -> None:
    assert cohen_kappa(["y", "y", "n", "n"], ["y", "y", "n", "n"]) == pytest.approx(1.0)
    assert cohen_kappa(["y", "n", "y", "n"], ["n", "y", "n", "y"]) == pytest.approx(-1.0)
    # 4 items, 3 agree; p_o = .75, p_e = .5 → κ = .5
    assert cohen_kappa(["y", "y", "n", "n"], ["y", "n", "n", "n"]) == pytest.approx(0.5)
    assert math.isnan(cohen_kappa(["y", "y"], ["y", "y"])) and math.isnan(cohen_kappa([], []))


def test_agreement_table_and_manifest(tmp_path: Path) -> None:
    cases = [_case(i, effusion=i < 2) for i in range(4)]  # the model says present on 0, 1
    store = ReviewStore(tmp_path / "r.sqlite")
    truth = {"alice": ["present", "absent", "absent", "absent"], "bob": ["present", "absent", "absent", "present"]}
    for who, values in truth.items():
        for c, v in zip(cases, values, strict=True):
            model = "present" if c.findings[0].decision else "absent"
            action = "accept" if v == model else "reject"
            store.decide(who, CaseRef(c.domain, c.case_id, c.path), "Effusion", action, model,
                         confirm_disagreement=True)  # fmt: skip
    table = agreement_table(cases, store).set_index(["rater_a", "rater_b"])
    assert table.loc[("model", "alice"), "agreement"] == 0.75 and table.loc[("model", "alice"), "kappa"] == 0.5
    assert table.loc[("alice", "bob"), "n"] == 4 and table.loc[("alice", "bob"), "agreement"] == 0.75

    manifest = reviewed_manifest(cases, store)
    assert manifest["path"].tolist() == ["/data/f0.png", "/data/f1.png", "/data/f2.png", "/data/f3.png"]
    assert manifest["Effusion"].tolist()[:3] == [1.0, 0.0, 0.0] and math.isnan(manifest["Effusion"].iloc[3])
    assert manifest["meta_reviewers"].iloc[0] == "alice,bob" and manifest["group"].iloc[0] == "sha256:0"
    out = export_manifest(cases, store, tmp_path / "reviewed.csv")
    assert pd.read_csv(out).shape[0] == 4
