"""`loupe score` end to end, in-process, on a small folder of real-format files with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from loupe.core.io import read_any
from loupe.core.models import load_model_dir
from loupe.core.transforms import ModelInput
from loupe.workflows.cli import app

runner = CliRunner()


def _score(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["score", "cxr", *args])
    return res.exit_code, res.output


def test_one_row_per_input_scores_match_the_model_and_failures_exit_1(
    inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path, store: str
) -> None:
    root, files = inputs
    out = tmp_path / "preds.parquet"
    code, output = _score(
        "--input", str(root), "--model", f"local-dir:{model_dir}", "--out", str(out), "--tracking-uri", store,
        "--batch-size", "4", "--num-workers", "1",
    )  # fmt: skip
    assert code == 1, output
    df = pd.read_parquet(out)
    rel = [p.relative_to(root).as_posix() for p in files["good"] + files["bad"]]  # paths recorded from the root
    assert sorted(df["path"]) == sorted(rel)
    assert not df["path"].duplicated().any()
    ok, failed = df[df.status == "ok"], df[df.status != "ok"]
    bad = sorted(p.relative_to(root).as_posix() for p in files["bad"])
    assert len(ok) == len(files["good"]) and sorted(failed["path"]) == bad
    assert failed["status"].str.startswith("failed: ").all() and failed["score_Pneumonia"].isna().all()
    assert "scoring summary" in output and "1 other files skipped" in output

    # provenance
    model, spec = load_model_dir(model_dir)
    assert set(df.model_name) == {"tiny-cxr"} and set(df.model_version) == {"7"}
    assert set(df.preprocessing_hash) == {spec.preprocessing_hash()}
    assert df.weights_sha256.str.len().eq(64).all() and ok.content_sha256.str.len().eq(64).all()
    assert (ok.content_id == "sha256:" + ok.content_sha256).all() and (ok.n_units == 1).all()
    assert [dict(s) for s in ok.scores] == [{"Effusion": e, "Pneumonia": p} for e, p in
                                            zip(ok.score_Effusion, ok.score_Pneumonia, strict=True)]  # fmt: skip
    assert json.loads(df.thresholds.iloc[0]) == {"Effusion": 0.5, "Pneumonia": 0.3}
    assert set(df.threshold_source) == {"mixed"}

    # scores are the model's sigmoid on exactly the spec's preprocessing; decisions at the stored thresholds
    row = ok.iloc[0]
    img = read_any(root / row.path)
    x = ModelInput(spec)(img.array, img.meta.get("bits_stored") or img.meta.get("bit_depth"))
    with torch.inference_mode():
        expected = torch.sigmoid(model(x[None]))[0].double()
    torch.testing.assert_close(torch.tensor([row.score_Effusion, row.score_Pneumonia]), expected, atol=1e-6, rtol=0)
    assert (ok.decision_Pneumonia == (ok.score_Pneumonia >= 0.3)).all()
    assert (ok.decision_Effusion == (ok.score_Effusion >= 0.5)).all()

    # no identifiers from the DICOM header, no path
    dicom_meta = json.loads(ok[ok.path.str.endswith("ct.dcm")].meta.iloc[0])
    assert dicom_meta["modality"] == "CT" and not any("uid" in k for k in dicom_meta) and "path" not in dicom_meta

    # the run is in MLflow with counts and the table
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("loupe-scoring").experiment_id])
    assert run.data.metrics["rows_ok"] == len(ok) and run.data.metrics["rows_failed"] == 2
    assert run.data.params["weights_sha256"] == df.weights_sha256.iloc[0]
    assert not any(str(root) in v or str(tmp_path) in v for v in run.data.params.values())  # no user paths
    assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/preds.parquet"]


def test_usage_errors_exit_2_with_the_fix(inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path) -> None:
    root, _ = inputs
    out = tmp_path / "p.parquet"
    base = ["--input", str(root), "--out", str(out), "--no-track", "--num-workers", "0"]
    assert _score(*base, "--model", f"local-dir:{model_dir}")[0] == 1
    code, output = _score(*base, "--model", f"local-dir:{model_dir}")
    assert code == 2 and "--resume" in output and "--overwrite" in output
    code, output = _score(*base, "--model", "vit_micro_patch8", "--overwrite")
    assert code == 2 and "without trained weights" in output
    code, output = _score(*base, "--model", str(model_dir), "--overwrite")
    assert code == 2 and f"local-dir:{model_dir}" in output
    code, output = _score(*base, "--model", f"local-dir:{model_dir}", "--resume", "--overwrite")
    assert code == 2 and "pick one" in output
    res = runner.invoke(app, ["score", "cxrr", *base, "--model", f"local-dir:{model_dir}", "--overwrite"])
    assert res.exit_code == 2 and "Did you mean 'cxr'" in res.output


def test_resume_scores_only_new_and_failed_inputs(inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path) -> None:
    root, files = inputs
    out = tmp_path / "p.parquet"
    base = ["--input", str(root), "--model", f"local-dir:{model_dir}", "--out", str(out), "--no-track"]
    assert _score(*base, "--num-workers", "0")[0] == 1
    first = pd.read_parquet(out).set_index("path")
    for p in files["bad"]:
        p.unlink()  # the user removes the broken files and adds a new one
    new = root / "new.png"
    new.write_bytes(files["good"][1].read_bytes())
    code, output = _score(*base, "--num-workers", "0", "--resume")
    assert code == 0, output
    df = pd.read_parquet(out).set_index("path")
    assert sorted(df.index) == sorted(p.relative_to(root).as_posix() for p in [*files["good"], new])
    assert (df.status == "ok").all()
    kept = [p.relative_to(root).as_posix() for p in files["good"]]
    pd.testing.assert_series_equal(df.loc[kept, "scored_at"], first.loc[kept, "scored_at"])  # not re-scored
    assert "0 failed, " in output and f"{len(files['good'])} already scored" in output


def test_explain_writes_overlays_next_to_the_table(inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    root, files = inputs
    out = tmp_path / "p.parquet"
    code, _ = _score(
        "--input", str(root), "--model", f"local-dir:{model_dir}", "--out", str(out), "--no-track", "--explain",
        "--num-workers", "0",
    )  # fmt: skip
    assert code == 1
    ok = pd.read_parquet(out).query("status == 'ok'")
    assert ok.explain_path.notna().all()
    for p, refs in zip(ok.explain_path, ok.artifacts, strict=True):
        assert (tmp_path / p).parent == tmp_path / "p.parquet.artifacts"  # relative to the table's folder
        (cam,) = json.loads(refs)
        assert cam["kind"] == "gradcam" and cam["picture"] == p and cam["frame"]["space"] == "region"
        data = np.asarray(Image.open(tmp_path / cam["path"]))
        assert data.dtype == np.uint16 and data.shape == (32, 32) and data.max() > data.min()  # the map, as data
        with Image.open(tmp_path / p) as im:
            assert im.mode == "RGB" and min(im.size) >= 256
            assert im.size[0] == 2 * im.size[1]  # the film as seen, beside the film under the map
            left, right = np.asarray(im)[:, : im.size[1]], np.asarray(im)[:, im.size[1] :]
            assert np.abs(left.astype(int) - right.astype(int)).mean() > 5


def test_registry_alias_round_trip_then_score_by_champion(
    inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path, store: str, make_model: object
) -> None:
    from loupe.core.tracking import MlflowTracker

    tracker = MlflowTracker(store)
    run_ids = []
    for i, folder in enumerate([model_dir, make_model(tmp_path / "m2", seed=1)]):
        with tracker.run(f"train-{i}", experiment="t") as run:
            run.log_model_dir(folder)
        run_ids.append(run.run_id)
    res = runner.invoke(app, ["models", "register", "--run-id", run_ids[0], "--name", "cxr-tiny", "--alias",
                              "champion", "--tracking-uri", store])  # fmt: skip
    assert res.exit_code == 0 and "version 1" in res.output, res.output
    res = runner.invoke(
        app, ["models", "register", "--run-id", run_ids[1], "--name", "cxr-tiny", "--tracking-uri", store]
    )
    assert res.exit_code == 0 and "version 2" in res.output
    res = runner.invoke(app, ["models", "alias", "cxr-tiny", "2", "challenger", "--tracking-uri", store])
    assert res.exit_code == 0
    res = runner.invoke(app, ["models", "registered", "--json", "--tracking-uri", store])
    listed = {(r["version"], tuple(r["aliases"])) for r in json.loads(res.output)}
    assert listed == {("1", ("champion",)), ("2", ("challenger",))}
    out = tmp_path / "p.parquet"
    base = ["--input", str(root := inputs[0]), "--out", str(out), "--tracking-uri", store, "--num-workers", "0"]
    code, output = _score(*base, "--model", "models:/cxr-tiny@champion")
    assert code == 1, output
    df = pd.read_parquet(out)
    assert set(df.model_name) == {"cxr-tiny"} and set(df.model_version) == {"1"}
    assert set(df.model_source) == {"models:/cxr-tiny@champion"}
    code, output = _score(*base, "--model", "models:/cxr-tiny@challenger", "--resume")
    assert code == 2 and "different model" in output  # a table holds one model's scores
    assert root.is_dir()


def test_models_without_subcommand_still_lists() -> None:
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0 and "vit_micro_patch8" in res.output


@pytest.mark.parametrize("bad", ["register --name x", "alias x"])
def test_models_subcommand_usage_errors_exit_2(bad: str) -> None:
    assert runner.invoke(app, ["models", *bad.split()]).exit_code == 2


@pytest.mark.parametrize("content", ["nothing", "other files"])
def test_a_folder_without_images_is_a_usage_error(tmp_path: Path, model_dir: Path, content: str) -> None:
    root = tmp_path / "in"
    root.mkdir()
    if content == "other files":
        (root / "notes.txt").write_text("not an image")
        (root / "labels.csv").write_text("path,label\n")
    out = tmp_path / "p.parquet"
    code, output = _score("--input", str(root), "--model", f"local-dir:{model_dir}", "--out", str(out), "--no-track")
    assert code == 2, output
    assert str(root) in output and "no images or DICOM" in output
    assert ("2 other files" in output) == (content == "other files")
    assert not out.exists() and not out.with_name("p.parquet.parts").exists()


def test_a_manifest_row_for_a_missing_file_is_a_failed_row_that_says_how_to_fix(
    tmp_path: Path, model_dir: Path, inputs: tuple[Path, dict]
) -> None:
    root, files = inputs
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(files["good"][0]), "gone/missing.png"]}).to_csv(manifest, index=False)
    out = tmp_path / "p.parquet"
    code, output = _score("--input", str(manifest), "--model", f"local-dir:{model_dir}", "--out", str(out),
                          "--no-track", "--num-workers", "0")  # fmt: skip
    assert code == 1, output
    status = pd.read_parquet(out).set_index("status").index
    failed = [s for s in status if s != "ok"]
    assert len(failed) == 1 and "does not exist" in failed[0] and "manifest" in failed[0]
    assert "Errno" not in failed[0] and "FileNotFoundError" not in failed[0]
