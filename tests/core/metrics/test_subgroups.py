from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from loupe.core.metrics import MetricInputError, age_band, subgroup_table

NAN = np.nan


def _hand_case():
    # rows 0-3 female, 4-7 male; label A defined everywhere, label B has one unknown per sex
    Y = np.array(
        [[0, 1], [0, 0], [1, NAN], [1, 1], [0, 0], [1, 0], [0, 0], [1, NAN]],
    )
    S = np.array(
        [[0.1, 0.9], [0.4, 0.5], [0.35, 0.1], [0.8, 0.4], [0.2, 0.3], [0.7, 0.6], [0.6, 0.2], [0.9, 0.5]],
    )
    meta = pd.DataFrame({"sex": ["F"] * 4 + ["M"] * 4, "age": [25, 35, 45, 55, 65, 75, 85, 30]}, index=range(10, 18))
    return Y, S, meta


def test_subgroup_table_hand_case():
    Y, S, meta = _hand_case()
    t = subgroup_table(Y, S, ["A", "B"], meta, by=["sex"], min_n=1)
    t = t.set_index(["group", "label"])
    # A overall: positives .35 .8 .7 .9 vs negatives .1 .4 .2 .6 -> 14 of 16 pairs ordered -> .875
    # A female: .35 beats .1 not .4, .8 beats both -> 3/4; A male: .7, .9 beat .2, .6 -> 1
    # B overall: positives .9 .4 vs negatives .5 .3 .6 .2 -> 4 + 2 of 8 -> .75
    # B female: .9 beats .5, .4 does not -> 1/2; B male: negatives only -> NaN
    expected = {
        ("F", "A"): (4, 2, 0.75, 0.875),
        ("M", "A"): (4, 2, 1.0, 0.875),
        ("F", "B"): (3, 2, 0.5, 0.75),
        ("M", "B"): (3, 0, NAN, 0.75),
    }
    for key, (n, n_pos, auc, overall) in expected.items():
        row = t.loc[key]
        assert (row.n, row.n_pos) == (n, n_pos)
        np.testing.assert_allclose([row.auroc, row.overall_auroc, row.gap], [auc, overall, auc - overall])
    # macro: F averages A and B (.625 vs .8125); M has only A defined (1 vs .875)
    np.testing.assert_allclose(
        t.loc[("F", "macro"), ["auroc", "overall_auroc", "gap"]].astype(float), [0.625, 0.8125, -0.1875]
    )
    np.testing.assert_allclose(
        t.loc[("M", "macro"), ["auroc", "overall_auroc", "gap"]].astype(float), [1.0, 0.875, 0.125]
    )
    assert t.loc[("F", "macro"), "n"] == 4 and pd.isna(t.loc[("F", "macro"), "n_pos"])


def test_min_n_hides_small_cells():
    Y, S, meta = _hand_case()
    t = subgroup_table(Y, S, ["A", "B"], meta, by=["sex"], min_n=4, macro=False)
    assert t.set_index(["group", "label"]).loc[("F", "A"), "auroc"] == 0.75
    assert t.loc[t["label"] == "B", "auroc"].isna().all()  # n = 3 < 4


def test_age_band_attribute_and_missing_values():
    Y, S, meta = _hand_case()
    meta = meta.assign(age_band=age_band(meta["age"]), view=["PA", "AP", None, "PA", "AP", "PA", "AP", "PA"])
    t = subgroup_table(Y, S, ["A", "B"], meta, by=["sex", "age_band", "view"], min_n=1)
    assert t["attribute"].unique().tolist() == ["sex", "age_band", "view"]
    bands = t.loc[(t["attribute"] == "age_band") & (t["label"] == "A")]
    assert bands["group"].tolist() == ["20-39", "40-59", "60-79", "80+"]  # age order, empty bands dropped
    assert bands["n"].tolist() == [3, 2, 2, 1]
    views = t.loc[(t["attribute"] == "view") & (t["label"] == "A")]
    assert views["n"].sum() == 7  # the row without a view is left out


@pytest.mark.parametrize("seed", [0, 1])
def test_subgroup_auroc_matches_sklearn_on_subset(seed):
    rng = np.random.default_rng(seed)
    Y = (rng.random((300, 2)) < 0.3).astype(float)
    S = rng.random((300, 2)) + 0.4 * Y
    Y[rng.random((300, 2)) < 0.1] = np.nan
    meta = pd.DataFrame({"site": rng.choice(["x", "y", "z"], 300)})
    t = subgroup_table(Y, S, ["a", "b"], meta, by=["site"], min_n=10, macro=False)
    for row in t.itertuples():
        j = ["a", "b"].index(row.label)
        k = (meta["site"].to_numpy() == row.group) & ~np.isnan(Y[:, j])
        np.testing.assert_allclose(row.auroc, roc_auc_score(Y[k, j], S[k, j]))
        all_k = ~np.isnan(Y[:, j])
        np.testing.assert_allclose(row.gap, row.auroc - roc_auc_score(Y[all_k, j], S[all_k, j]))


def test_age_band_labels():
    ages = [5, 19.9, 20, 59, 60, 79, 80, 150, 200, NAN, -1]
    bands = age_band(ages)
    expected = ["0-19", "0-19", "20-39", "40-59", "60-79", "60-79", "80+", "80+", NAN, NAN, NAN]
    assert bands.astype(object).where(bands.notna(), NAN).tolist()[:8] == expected[:8]
    assert bands.isna().tolist()[8:] == [True] * 3
    assert list(bands.cat.categories) == ["0-19", "20-39", "40-59", "60-79", "80+"]
    assert age_band(pd.Series([30, 70], index=[7, 9])).index.tolist() == [7, 9]


def test_age_band_bad_edges():
    with pytest.raises(MetricInputError, match="strictly increasing"):
        age_band([30], edges=(0, 40, 20))


@pytest.mark.parametrize(
    "meta,match",
    [
        (pd.DataFrame({"sex": ["F"] * 3}), "meta has 3 rows but Y has 8"),
        (pd.DataFrame({"gender": ["F"] * 8}), "lacks subgroup columns \\['sex'\\]"),
    ],
)
def test_bad_meta_raises(meta, match):
    Y, S, _ = _hand_case()
    with pytest.raises(MetricInputError, match=match):
        subgroup_table(Y, S, ["A", "B"], meta, by=["sex"])
