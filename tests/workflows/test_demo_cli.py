"""`loupe demo` end to end (fast mode): inputs, demo model registered as champion, scoring, MLflow runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from loupe.workflows.cli import app


def test_demo_scores_every_input_and_logs_to_the_given_store(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    res = CliRunner().invoke(app, ["demo", "--fast", "--out", str(tmp_path / "demo"), "--tracking-uri", store])
    assert res.exit_code == 0, res.output
    table = tmp_path / "demo" / "cxr" / "predictions.parquet"
    df = pd.read_parquet(table)
    assert (df.status == "ok").sum() >= 6 and (df.status != "ok").sum() == 1  # the one corrupt file
    assert df.loc[df.status != "ok", "path"].str.endswith("corrupt_truncated_chest.dcm").all()
    assert set(df.model_source) == {"models:/cxr-demo@champion"} and df.explain_path.notna().sum() >= 6
    assert str(table) in res.output.replace("\n", "")
    assert f"mlflow ui --backend-store-uri {store}" in res.output.replace("\n", "")

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("loupe-demo").experiment_id])
    assert {r.info.run_name for r in runs} == {"demo-model-cxr", "score-cxr"}
    assert all(r.data.tags["demo"] == "true" for r in runs)
    assert str(client.get_model_version_by_alias("cxr-demo", "champion").version) == "1"
