"""The evaluation arithmetic on cases small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from loupe.core.evaluation import EvalConfig, choose_thresholds, evaluation_report

# men: scores rank every positive above every negative (AUROC 1); women: the reverse (AUROC 0).
Y = np.array([[1], [0], [1], [0], [1], [0], [1], [0]], dtype=float)
S = np.array([[0.9], [0.1], [0.8], [0.2], [0.3], [0.7], [0.4], [0.6]])
META = pd.DataFrame({"sex": ["M"] * 4 + ["F"] * 4, "view": ["PA"] * 8})


def test_overall_and_subgroup_auroc_with_gaps() -> None:
    # overall: positives {.9,.8,.3,.4} vs negatives {.1,.2,.7,.6}: .9 and .8 beat all 4, .3 and .4 beat 2 -> 12/16
    cfg = EvalConfig(n_boot=200, min_subgroup_n=2, subgroups=("sex", "age_band", "view"))
    report = evaluation_report(Y, S, ("Pneumonia",), cfg=cfg, meta=META, figures=False)
    row = report.per_finding.iloc[0]
    assert row["label"] == "Pneumonia" and row["auroc"] == pytest.approx(0.75)
    sub = report.subgroups.set_index(["attribute", "group", "label"])
    assert sub.loc[("sex", "M", "Pneumonia"), "auroc"] == pytest.approx(1.0)
    assert sub.loc[("sex", "F", "Pneumonia"), "auroc"] == pytest.approx(0.0)
    assert sub.loc[("sex", "M", "Pneumonia"), "gap"] == pytest.approx(0.25)
    assert sub.loc[("sex", "F", "Pneumonia"), "gap"] == pytest.approx(-0.75)
    assert sub.loc[("view", "PA", "Pneumonia"), "gap"] == pytest.approx(0.0)
    assert report.metrics["test_max_subgroup_gap"] == pytest.approx(0.75)
    assert report.metrics["test_macro_auroc"] == pytest.approx(0.75)


def test_bootstrap_interval_of_a_perfect_and_of_a_useless_score() -> None:
    men = slice(0, 4)
    perfect = evaluation_report(Y[men], S[men], ("P",), cfg=EvalConfig(n_boot=300), figures=False).per_finding
    # every resample that holds both classes still ranks all positives first: the interval collapses on 1
    assert perfect.iloc[0][["auroc", "ci_low", "ci_high"]].tolist() == [1.0, 1.0, 1.0]
    flat = evaluation_report(Y, np.full_like(S, 0.5), ("P",), cfg=EvalConfig(n_boot=300), figures=False).per_finding
    assert flat.iloc[0][["auroc", "ci_low", "ci_high"]].tolist() == [0.5, 0.5, 0.5]  # all ties: always 1/2


def test_interval_brackets_the_estimate_and_unknown_labels_are_masked() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 2)).astype(float)
    s = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.0, size=y.shape))))  # probabilities
    y_nan = y.copy()
    y_nan[:50, 1] = np.nan
    table = evaluation_report(y_nan, s, ("a", "b"), cfg=EvalConfig(n_boot=200), figures=False).per_finding
    a, b = table.iloc[0], table.iloc[1]
    assert a["ci_low"] < a["auroc"] < a["ci_high"] and b["n"] == 150
    from sklearn.metrics import roc_auc_score

    assert b["auroc"] == pytest.approx(roc_auc_score(y[50:, 1], s[50:, 1]))


@pytest.mark.parametrize("rule,expected", [("youden", 0.8), ("sensitivity", 0.3)])
def test_thresholds_on_validation(rule: str, expected: float) -> None:
    cfg = EvalConfig(threshold_rule=rule, target_sensitivity=1.0 - 1e-9)
    # youden: 0.8 separates men's positives perfectly from all negatives but .7/.6 -> J = 0.5 at 0.8
    th = choose_thresholds(Y, S, ("Pneumonia",), cfg)
    assert th["Pneumonia"] == pytest.approx(expected)


def test_bad_eval_config_message() -> None:
    from loupe.core.config import build
    from loupe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="threshold_rule: expected youden or sensitivity, got 'max'"):
        build(EvalConfig, {"threshold_rule": "max"})
