from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pytest
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from loupe.core.errors import TrackingError
from loupe.core.models import WeightSpec, build_model, load_model_dir, save_model
from loupe.core.tracking import MlflowTracker, NullTracker, default_tracking_uri


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_default_store_is_sqlite_under_loupe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


def test_run_is_visible_in_the_sqlite_store(store: str, tmp_path: Path) -> None:
    tracker = MlflowTracker(store)
    note = tmp_path / "table.csv"
    note.write_text("label,auroc\nA,0.9\n")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    with tracker.run("unit", experiment="loupe-test", tags={"domain": "cxr"}) as run:
        run.log_params({"lr": 0.001, "model": {"name": "vit"}})
        run.log_metrics({"val_auroc": 0.75}, step=0)
        run.log_metrics({"val_auroc": 0.8}, step=1)
        run.log_artifact(note)
        run.log_figure(fig, "plots/roc.png")
        run.log_dict({"a": 1}, "config.json")
    client = MlflowClient(tracking_uri=store)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["lr"] == "0.001" and got.data.params["model"] == '{"name": "vit"}'
    assert got.data.tags["domain"] == "cxr"
    history = client.get_metric_history(run.run_id, "val_auroc")
    assert [(m.step, m.value) for m in history] == [(0, 0.75), (1, 0.8)]
    names = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"table.csv", "plots", "config.json"} <= names
    local = client.download_artifacts(run.run_id, "table.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == note.read_text()
    # artifacts sit beside the database, not in the working directory
    assert (tmp_path / "mlartifacts").is_dir()


def test_failed_run_is_marked_failed(store: str) -> None:
    tracker = MlflowTracker(store)
    with pytest.raises(RuntimeError), tracker.run("boom", experiment="loupe-test") as run:
        raise RuntimeError("training diverged")
    assert MlflowClient(tracking_uri=store).get_run(run.run_id).info.status == "FAILED"


def test_interrupted_run_is_marked_killed(store: str) -> None:
    tracker = MlflowTracker(store)
    with pytest.raises(SystemExit), tracker.run("stopped", experiment="loupe-test") as run:
        raise SystemExit(143)  # what the CLI's SIGTERM handler raises
    assert MlflowClient(tracking_uri=store).get_run(run.run_id).info.status == "KILLED"


def test_a_run_left_running_by_a_killed_process_is_marked_killed_on_the_next_start(store: str) -> None:
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", (
        "import time; from loupe.core.tracking import MlflowTracker\n"
        f"with MlflowTracker({store!r}).run('doomed', experiment='loupe-test') as run:\n"
        "    print(run.run_id, flush=True); time.sleep(600)"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    run_id = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)  # no finally runs: the store still says RUNNING
    child.wait(timeout=30)
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "RUNNING"
    tracker = MlflowTracker(store)
    with tracker.run("live", experiment="loupe-test") as live:
        assert client.get_run(run_id).info.status == "KILLED"  # the next start closed it
        assert client.get_run(live.run_id).info.status == "RUNNING"  # a live process's run is left alone
    with tracker.run("after", experiment="loupe-test"):
        assert client.get_run(live.run_id).info.status == "FINISHED"


def test_model_registry_alias_round_trip(store: str, tmp_path: Path) -> None:
    spec = WeightSpec(
        name="m", architecture="vit_micro_patch8", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), label_names=("x",)
    )
    model, _ = build_model(spec)
    model.eval()
    tracker = MlflowTracker(store)
    with tracker.run("train", experiment="loupe-test") as run:
        run.log_model_dir(save_model(model, spec, tmp_path / "m"))
    version = tracker.register_model("demo-cxr", run.run_id, alias="champion")
    assert version == "1"
    local = tracker.resolve_model_uri("models:/demo-cxr@champion", tmp_path / "resolved")
    loaded, spec2 = load_model_dir(local)
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert spec2.label_names == ("x",)
    with pytest.raises(TrackingError, match="could not resolve 'models:/demo-cxr@nobody'"):
        tracker.resolve_model_uri("models:/demo-cxr@nobody", tmp_path / "x")
    assert tracker.model_version("models:/demo-cxr@champion") == ("demo-cxr", "1")
    assert tracker.registered_models() == [
        {"name": "demo-cxr", "version": "1", "aliases": ["champion"], "run_id": run.run_id}
    ]
    with pytest.raises(TrackingError, match="could not read the version behind 'models:/demo-cxr@nobody'"):
        tracker.model_version("models:/demo-cxr@nobody")


def test_null_tracker_records_in_memory() -> None:
    tracker = NullTracker()
    with tracker.run("r", experiment="e") as run:
        run.log_params({"a": 1})
        run.log_metrics({"m": 2.0}, step=3)
    assert tracker.runs[0].params == {"a": 1} and tracker.runs[0].metrics == {"m": [(3, 2.0)]}


def test_a_relative_sqlite_uri_is_a_store_beside_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = MlflowTracker("sqlite:///runs/mlflow.db")  # as users type it in a project folder
    with tracker.run("unit", experiment="loupe-relative") as run:
        run.log_dict({"a": 1}, "config.json")
    assert (tmp_path / "runs" / "mlflow.db").is_file() and (tmp_path / "runs" / "mlartifacts").is_dir()
    assert MlflowClient(tracking_uri="sqlite:///runs/mlflow.db").get_run(run.run_id).info.status == "FINISHED"
