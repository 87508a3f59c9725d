"""`loupe validate / train / evaluate / models / weights` driven in-process with typer's runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from loupe.core.recipes import Recipe, RunConfig, register_recipe
from loupe.core.registry import RECIPES
from loupe.workflows.cli import app

runner = CliRunner()


@dataclass(frozen=True)
class EchoConfig:
    steps: int = 1
    run: RunConfig = field(default_factory=RunConfig)

    def problems(self) -> list[str]:
        return [] if self.steps > 0 else [f"steps: must be > 0, got {self.steps}"]


if "test.echo" not in RECIPES:

    @register_recipe("test.echo", domain="test")
    class EchoRecipe(Recipe):
        """Logs one metric per step; a stand-in for a real recipe."""

        config_cls = EchoConfig

        def setup(self) -> None:
            self.calls = ["setup"]

        def train(self) -> dict:
            with self.tracker.run("echo", experiment=self.cfg.run.experiment) as run:
                for s in range(self.cfg.steps):
                    run.log_metrics({"loss": 1.0 / (s + 1)}, step=s)
            return {"steps": self.cfg.steps, "run_id": run.run_id}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "echo.yaml"
    p.write_text("recipe: test.echo\nsteps: 2\nrun:\n  experiment: cli-test\n")
    return p


def test_validate_prints_resolved_config_with_overrides(cfg: Path) -> None:
    res = runner.invoke(app, ["validate", str(cfg), "steps=7"])
    assert res.exit_code == 0, res.output
    assert '"steps": 7' in res.output and "valid" in res.output


def test_validate_bad_config_exits_2_with_every_problem(cfg: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["validate", str(cfg), "steps=0", "run.devce=cpu"])
    assert res.exit_code == 2
    assert "steps: must be > 0, got 0" in res.output  # both problems in one report
    assert "run.devce: unknown key (did you mean 'device'?)" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: test.ech\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 2 and "Did you mean 'test.echo'" in res.output


def test_train_logs_to_the_given_store(cfg: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    res = runner.invoke(app, ["train", str(cfg), "steps=3", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cli-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]


def test_evaluate_on_a_train_only_recipe_is_a_usage_error(cfg: Path) -> None:
    res = runner.invoke(app, ["evaluate", str(cfg), "run.track=false"])
    assert res.exit_code == 2 and "does not evaluate" in res.output


def test_models_lists_registered_names() -> None:
    res = runner.invoke(app, ["models", "--json"])
    assert res.exit_code == 0
    assert "vit_micro_patch8" in res.output and "cxr.nih14" in res.output and '"cxr"' in res.output


def test_weights_import_then_refuse_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path / "cache"))
    src = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    res = runner.invoke(app, ["weights", "import", str(src), "--tag", "my_tag"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cache" / "my_tag" / "weights.safetensors").is_file()
    res = runner.invoke(app, ["weights", "import", str(src), "--tag", "my_tag"])
    assert res.exit_code == 2 and "already exists" in res.output


@pytest.mark.parametrize("tag", ["../escaped", "a/b", "/abs", "..", "", "name with space", "x" * 200])
def test_weights_import_refuses_tags_that_are_not_plain_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    import torch

    monkeypatch.setenv("LOUPE_WEIGHTS_DIR", str(tmp_path / "cache" / "weights"))
    src = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    before = {p for p in tmp_path.rglob("*")}
    res = runner.invoke(app, ["weights", "import", str(src), "--tag", tag])
    assert res.exit_code == 2 and "tag" in res.output and "letters, digits" in res.output, res.output
    assert {p for p in tmp_path.rglob("*")} - before <= {tmp_path / "cache", tmp_path / "cache" / "weights"}
