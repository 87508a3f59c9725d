"""`loupe bench` on tiny settings: the numbers exist and are sane (the real figures come from full runs)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from loupe.workflows.cli import app

runner = CliRunner()


def test_throughput_reports_a_ratio_against_the_bare_forward() -> None:
    res = runner.invoke(
        app, ["bench", "throughput", "-n", "48", "--arch", "vit_micro_patch8", "--size", "32", "--num-workers", "0",
              "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["inputs"] == 48 and got["scoring_img_s"] > 0 and got["bare_forward_img_s"] > 0
    assert got["ratio_scoring_over_bare"] == pytest.approx(got["scoring_img_s"] / got["bare_forward_img_s"])


@pytest.mark.slow
def test_scoring_memory_runs_children_and_reports_a_ratio() -> None:
    res = runner.invoke(app, ["bench", "scoring-memory", "--small", "20", "--large", "60", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert set(got["runs"]) == {"20", "60"} and all(r["peak_rss_mib"] > 50 for r in got["runs"].values())
    assert 0.5 < got["ratio_peak_rss"] < 1.5


@pytest.mark.slow  # a benchmark of fresh processes (40 s)
def test_startup_measures_help_and_one_input_against_the_bare_model() -> None:
    res = runner.invoke(app, ["bench", "startup", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert 0 < got["help_s"] < got["bare_load_forward_s"] < got["score_one_untracked_s"]
    assert got["ratio_tracked_over_bare"] == pytest.approx(got["score_one_tracked_s"] / got["bare_load_forward_s"])
