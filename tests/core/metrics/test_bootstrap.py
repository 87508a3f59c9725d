from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from loupe.core.metrics import (
    MetricInputError,
    auroc,
    bootstrap_ci,
    per_label_auroc_ci,
    percentile_interval,
    resample_counts,
    weighted_auroc,
)


def _mean_s(y, s):
    return float(np.mean(s))


def test_percentile_interval_by_hand():
    values = np.r_[np.arange(101.0), np.nan]  # NaN = undefined resample, ignored
    assert percentile_interval(values, 0.05) == (2.5, 97.5)
    assert percentile_interval(values, 0.5) == (25.0, 75.0)
    assert all(np.isnan(percentile_interval([np.nan])))


def test_two_point_case_by_hand():
    # Resampling 2 items with scores 0 and 1: the mean is 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    # 95% CI -> (0, 1); a 40% CI (30th..70th percentiles) sits inside the 0.5 mass -> (0.5, 0.5).
    y, s = np.array([0.0, 1.0]), np.array([0.0, 1.0])
    ci = bootstrap_ci(_mean_s, y, s, n_boot=2000, seed=1)
    assert (ci.estimate, ci.low, ci.high, ci.n_used, ci.n_boot) == (0.5, 0.0, 1.0, 2000, 2000)
    ci = bootstrap_ci(_mean_s, y, s, n_boot=2000, alpha=0.6, seed=1)
    assert (ci.low, ci.high) == (0.5, 0.5)


def test_separable_auroc_ci_is_degenerate_and_counts_usable_resamples():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    ci = bootstrap_ci(auroc, y, s, n_boot=500, seed=0)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)
    counts = next(resample_counts(5, 500, seed=0))
    both = ((counts[:, :3].sum(1) > 0) & (counts[:, 3:].sum(1) > 0)).sum()
    assert ci.n_used == both < 500  # one-class resamples happen with 5 items and are skipped


def test_ci_is_quantile_of_the_metric_values_seen():
    seen = []

    def metric(y, s):
        v = auroc(y, s)
        seen.append(v)
        return v

    rng = np.random.default_rng(2)
    y = (rng.random(40) < 0.2).astype(float)
    s = rng.random(40) + 0.3 * y
    ci = bootstrap_ci(metric, y, s, n_boot=300, seed=3)
    values = np.array(seen[:300])  # the last call is the full-data estimate
    assert ci.n_used == np.sum(~np.isnan(values))
    low, high = np.quantile(values[~np.isnan(values)], [0.025, 0.975])
    assert (ci.low, ci.high) == (low, high)
    assert ci.estimate == seen[-1] == auroc(y, s)


def test_resample_counts_keep_groups_whole():
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3"])
    counts = np.concatenate(list(resample_counts(6, 200, seed=0, groups=groups)))
    assert counts.shape == (200, 6)
    assert (counts[:, 0] == counts[:, 1]).all() and (counts[:, 3] == counts[:, 5]).all()
    # 3 groups are drawn per resample: sizes add up to 2*c(p1) + 1*c(p2) + 3*c(p3) with c summing to 3
    assert ((counts[:, 0] + counts[:, 2] + counts[:, 3]) == 3).all()


def test_cluster_bootstrap_of_duplicated_items_equals_item_bootstrap():
    rng = np.random.default_rng(4)
    y = (rng.random(30) < 0.4).astype(float)
    s = rng.random(30) + 0.4 * y
    item = bootstrap_ci(auroc, y, s, n_boot=200, seed=5)
    # every patient has two identical images: AUROC is unchanged by doubling, and groups are drawn like the items
    clustered = bootstrap_ci(
        auroc, np.repeat(y, 2), np.repeat(s, 2), n_boot=200, seed=5, groups=np.repeat(np.arange(30), 2)
    )
    np.testing.assert_allclose([clustered.low, clustered.high], [item.low, item.high], rtol=1e-12)
    assert clustered.n_used == item.n_used
    naive = bootstrap_ci(auroc, np.repeat(y, 2), np.repeat(s, 2), n_boot=200, seed=5)
    assert naive.high - naive.low < item.high - item.low  # ignoring the grouping understates the uncertainty


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_auroc_matches_sklearn_sample_weight(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.3).astype(float)
    s = np.round(rng.random(80) + 0.3 * y, 1)  # many ties
    w = rng.integers(0, 4, size=(5, 80)).astype(float)
    expected = [roc_auc_score(y, s, sample_weight=row) for row in w]
    np.testing.assert_allclose(weighted_auroc(y, s, w), expected, rtol=1e-12)
    assert np.isnan(weighted_auroc(y, s, (y == 1)[None].astype(float)))[0]  # positives only


def test_per_label_ci_equals_generic_bootstrap_per_label():
    rng = np.random.default_rng(6)
    Y = (rng.random((60, 3)) < 0.3).astype(float)
    S = rng.random((60, 3)) + 0.4 * Y
    Y[rng.random((60, 3)) < 0.15] = np.nan
    groups = rng.integers(0, 25, 60)
    df = per_label_auroc_ci(Y, S, ["a", "b", "c"], n_boot=150, seed=7, groups=groups)
    assert df["label"].tolist() == ["a", "b", "c", "macro"]
    for j in range(3):
        ci = bootstrap_ci(auroc, Y[:, j], S[:, j], n_boot=150, seed=7, groups=groups)
        row = df.iloc[j]
        np.testing.assert_allclose([row.auroc, row.ci_low, row.ci_high], [ci.estimate, ci.low, ci.high], rtol=1e-12)
        assert row.n_boot_used == ci.n_used
    macro = df.iloc[3]
    np.testing.assert_allclose(macro.auroc, df["auroc"].iloc[:3].mean())
    assert macro.ci_low <= macro.auroc <= macro.ci_high


def test_per_label_ci_speed_600_items_14_labels():
    rng = np.random.default_rng(8)
    Y = (rng.random((600, 14)) < 0.2).astype(float)
    S = rng.random((600, 14)) + 0.3 * Y
    t0 = time.perf_counter()
    df = per_label_auroc_ci(Y, S, n_boot=1000, groups=rng.integers(0, 250, 600))
    assert time.perf_counter() - t0 < 5.0
    assert (df["ci_low"] < df["auroc"]).all() and (df["auroc"] < df["ci_high"]).all()


def test_seed_controls_resamples():
    y = np.array([0, 1, 0, 1, 0, 1, 1, 0.0])
    s = np.array([0.1, 0.7, 0.4, 0.3, 0.2, 0.9, 0.6, 0.5])
    a = bootstrap_ci(auroc, y, s, n_boot=100, seed=1)
    assert a == bootstrap_ci(auroc, y, s, n_boot=100, seed=1)
    assert a != bootstrap_ci(auroc, y, s, n_boot=100, seed=2)


@pytest.mark.parametrize("kw,match", [({"alpha": 0.0}, "alpha must be in"), ({"n_boot": 0}, "n_boot must be")])
def test_bad_bootstrap_args_raise(kw, match):
    with pytest.raises(MetricInputError, match=match):
        bootstrap_ci(auroc, [0, 1], [0.1, 0.2], **kw)


def test_groups_length_checked():
    with pytest.raises(MetricInputError, match="one id per sample"):
        bootstrap_ci(auroc, [0, 1, 1], [0.1, 0.2, 0.3], groups=[1, 2])


def test_paired_difference_equals_the_difference_on_each_shared_resample():
    from loupe.core.metrics import macro_auroc, paired_macro_auroc_difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    Y = np.stack([y, 1 - y], 1).astype(float)
    S_a = Y + rng.normal(0, 0.8, Y.shape)  # the better model
    S_b = Y + rng.normal(0, 2.0, Y.shape)
    d = paired_macro_auroc_difference(Y, S_a, S_b, n_boot=200, seed=5)
    assert d.estimate == pytest.approx(macro_auroc(Y, S_a) - macro_auroc(Y, S_b))
    by_hand = []
    for counts in resample_counts(len(Y), 200, seed=5):
        for row in counts:
            idx = np.repeat(np.arange(len(Y)), row)
            by_hand.append(macro_auroc(Y[idx], S_a[idx]) - macro_auroc(Y[idx], S_b[idx]))
    assert (d.low, d.high) == pytest.approx(percentile_interval(np.array(by_hand)))
    assert d.low > 0  # paired: A is better on (almost) every resample
    same = paired_macro_auroc_difference(Y, S_a, S_a, n_boot=50)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
