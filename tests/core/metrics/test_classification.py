from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import (
    binary_sensitivity_at_specificity,
    binary_specificity_at_sensitivity,
)

from loupe.core.metrics import (
    MetricInputError,
    auroc,
    average_precision,
    eer,
    macro_auroc,
    macro_mean,
    per_label_auroc,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    threshold_for_sensitivity,
    threshold_metrics,
    youden_threshold,
)


def _data(seed: int, n: int = 300, nan_frac: float = 0.2, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(float)
    s = rng.random(n) + 0.6 * y
    if ties:
        s = np.round(s, 1)
    y[rng.random(n) < nan_frac] = np.nan
    return y, s


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False)])
def test_auroc_and_ap_match_sklearn_on_known_labels(seed, ties):
    y, s = _data(seed, ties=ties)
    k = ~np.isnan(y)
    np.testing.assert_allclose(auroc(y, s), roc_auc_score(y[k], s[k]), rtol=1e-12)
    np.testing.assert_allclose(average_precision(y, s), average_precision_score(y[k], s[k]), rtol=1e-12)


def test_nan_label_does_not_change_result_whatever_its_score():
    y, s = _data(3, nan_frac=0.0)
    y2, s2 = np.r_[y, np.nan, np.nan], np.r_[s, 100.0, -100.0]
    assert auroc(y2, s2) == auroc(y, s)
    assert average_precision(y2, s2) == average_precision(y, s)


def test_torch_tensors_accepted():
    y, s = _data(4)
    np.testing.assert_allclose(auroc(torch.tensor(y), torch.tensor(s)), auroc(y, s))


def test_single_class_after_masking_is_nan_with_debug_log(caplog):
    y = np.array([1.0, 1.0, np.nan, np.nan])
    s = np.array([0.2, 0.9, 0.1, 0.5])
    with caplog.at_level(logging.DEBUG, logger="loupe.core.metrics.classification"):
        assert np.isnan(auroc(y, s))
        assert np.isnan(average_precision(y, s))
    assert "needs both classes" in caplog.text


@pytest.mark.parametrize(
    "y,s,match",
    [
        ([0, 1, 0.5], [0.1, 0.2, 0.3], "labels must be 1, 0 or NaN"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "scores are NaN"),
        ([0, 1, 1], [0.1, 0.3], "shape"),
        (np.zeros((3, 2)), np.zeros((3, 2)), "must be 1-D"),
    ],
)
def test_bad_inputs_raise(y, s, match):
    with pytest.raises(MetricInputError, match=match):
        auroc(y, s)


def test_per_label_table_and_macro():
    rng = np.random.default_rng(5)
    Y = (rng.random((200, 3)) < 0.4).astype(float)
    S = rng.random((200, 3)) + 0.5 * Y
    Y[rng.random((200, 3)) < 0.1] = np.nan
    Y[:, 2] = np.where(np.isnan(Y[:, 2]), np.nan, 0.0)  # third label: negatives only -> undefined
    df = per_label_auroc(Y, S, ["a", "b", "c"])
    assert list(df.columns) == ["label", "n", "n_pos", "auroc", "ap"]
    assert df["label"].tolist() == ["a", "b", "c"]
    for j in range(2):
        k = ~np.isnan(Y[:, j])
        assert df.loc[j, "n"] == k.sum()
        assert df.loc[j, "n_pos"] == Y[k, j].sum()
        np.testing.assert_allclose(df.loc[j, "auroc"], roc_auc_score(Y[k, j], S[k, j]))
        np.testing.assert_allclose(df.loc[j, "ap"], average_precision_score(Y[k, j], S[k, j]))
    assert np.isnan(df.loc[2, "auroc"]) and df.loc[2, "n_pos"] == 0
    np.testing.assert_allclose(macro_auroc(Y, S), df["auroc"].iloc[:2].mean())
    assert np.isnan(macro_mean([np.nan, np.nan]))


def test_per_label_name_count_checked():
    with pytest.raises(MetricInputError, match="2 label names for 3 label columns"):
        per_label_auroc(np.zeros((4, 3)), np.zeros((4, 3)), ["a", "b"])


def test_threshold_metrics_hand_case():
    y = [1, 1, 1, 0, 0, np.nan]
    s = [0.9, 0.5, 0.2, 0.5, 0.1, 0.99]
    m = threshold_metrics(y, s, 0.5)  # >= 0.5 is positive: TP 2, FN 1, FP 1, TN 1
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)


def test_threshold_metrics_match_sklearn():
    y, s = _data(6)
    k = ~np.isnan(y)
    m = threshold_metrics(y, s, 0.7)
    pred = s[k] >= 0.7
    np.testing.assert_allclose(m["accuracy"], accuracy_score(y[k], pred))
    np.testing.assert_allclose(m["sensitivity"], recall_score(y[k], pred))
    np.testing.assert_allclose(m["specificity"], recall_score(y[k], pred, pos_label=0))
    np.testing.assert_allclose(m["precision"], precision_score(y[k], pred))
    np.testing.assert_allclose(m["f1"], f1_score(y[k], pred))


def test_precision_undefined_when_nothing_called_positive():
    m = threshold_metrics([0, 1], [0.1, 0.2], 0.9)
    assert np.isnan(m["precision"]) and m["sensitivity"] == 0.0 and m["f1"] == 0.0


@pytest.mark.parametrize("seed,level", [(7, 0.8), (8, 0.9), (9, 0.95)])
def test_operating_points_match_torchmetrics(seed, level):
    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(rng.random(400) * 0.7 + 0.3 * y, 0, 1)
    tm_sens, _ = binary_sensitivity_at_specificity(torch.tensor(p), torch.tensor(y).long(), level)
    tm_spec, _ = binary_specificity_at_sensitivity(torch.tensor(p), torch.tensor(y).long(), level)
    np.testing.assert_allclose(sensitivity_at_specificity(y, p, level), tm_sens.item(), rtol=1e-6)
    np.testing.assert_allclose(specificity_at_sensitivity(y, p, level), tm_spec.item(), rtol=1e-6)


def test_sensitivity_at_specificity_hand_case():
    y = [0, 0, 0, 0, 1, 1]
    s = [0.1, 0.2, 0.3, 0.8, 0.5, 0.9]
    # spec >= 0.75 allows one FP at most: threshold 0.5 gives spec 0.75, sens 1
    assert sensitivity_at_specificity(y, s, 0.75) == 1.0
    # spec 1 requires thr > 0.8: only 0.9 is positive
    assert sensitivity_at_specificity(y, s, 1.0) == 0.5
    assert specificity_at_sensitivity(y, s, 1.0) == 0.75


def test_youden_threshold_hand_case():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.4, 0.6, 0.35, 0.7, 0.8]
    # thr 0.7: sens 2/3, spec 1 -> J 2/3; thr 0.35: sens 1, spec 1/3 -> J 1/3; thr 0.6: sens 2/3, spec 2/3
    assert youden_threshold(y, s) == 0.7


def test_youden_threshold_never_returns_the_nothing_positive_point():
    # inverted scores: every J <= 0; the +inf point of the ROC curve is not an operating threshold
    assert youden_threshold([1, 0], [0.1, 0.9]) == 0.1


def test_threshold_for_sensitivity_is_highest_meeting_target():
    y, s = _data(10, nan_frac=0.0)
    thr = threshold_for_sensitivity(y, s, 0.9)
    assert threshold_metrics(y, s, thr)["sensitivity"] >= 0.9
    higher = np.min(s[s > thr])
    assert threshold_metrics(y, s, higher)["sensitivity"] < 0.9


def test_eer_known_answers():
    # at threshold 0.6: one of two negatives above (FPR 0.5), one of two positives below (FNR 0.5)
    assert eer([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == (0.5, 0.6)
    rate, thr = eer([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert rate == 0.0 and thr == 0.3
    assert eer([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])[0] == 1.0
    assert all(np.isnan(eer([1, 1], [0.1, 0.2])))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_eer_matches_brentq_crossing(seed):
    y, s = _data(seed, nan_frac=0.0, n=500)
    fpr, tpr, thr = roc_curve(y, s)
    expected = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    rate, t = eer(y, s)
    np.testing.assert_allclose(rate, expected, atol=1e-9)
    m = threshold_metrics(y, s, t)  # the returned threshold sits near the crossing
    assert abs((1 - m["specificity"]) - rate) < 0.02 and abs((1 - m["sensitivity"]) - rate) < 0.02
