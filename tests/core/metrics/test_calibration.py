from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_calibration_error

from loupe.core.metrics import MetricInputError, expected_calibration_error, reliability_plot, reliability_table


def test_ece_hand_case():
    y = [0, 1, 1, 1]
    p = [0.2, 0.3, 0.8, 0.9]
    # bin [0, .5): mean p .25, fraction .5 -> .25 * 2/4; bin [.5, 1]: mean p .85, fraction 1 -> .15 * 2/4
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.2)


@pytest.mark.parametrize("seed,n_bins", [(0, 15), (1, 10), (2, 5)])
def test_ece_matches_torchmetrics(seed, n_bins):
    rng = np.random.default_rng(seed)
    p = rng.random(1000)
    y = (rng.random(1000) < p**1.5).astype(float)  # miscalibrated on purpose
    expected = binary_calibration_error(torch.tensor(p), torch.tensor(y).long(), n_bins=n_bins, norm="l1")
    np.testing.assert_allclose(expected_calibration_error(y, p, n_bins), expected.item(), rtol=1e-6)


def test_ece_masks_nan_labels():
    rng = np.random.default_rng(3)
    p = rng.random(200)
    y = (rng.random(200) < p).astype(float)
    ref = expected_calibration_error(y, p)
    assert expected_calibration_error(np.r_[y, np.nan], np.r_[p, 0.01]) == ref


def test_reliability_table_bins():
    y = [0, 1, 1, 1]
    p = [0.2, 0.25, 0.8, 1.0]  # bins are [lower, upper): 0.25 opens bin 1; p == 1 lands in the last bin
    t = reliability_table(y, p, n_bins=4)
    assert t["n"].tolist() == [1, 1, 0, 2]
    np.testing.assert_allclose(t["lower"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(t.loc[3, "mean_predicted"], 0.9)
    np.testing.assert_allclose(t.loc[1, "gap"], 1 - 0.25)
    assert np.isnan(t.loc[2, "fraction_positive"])
    np.testing.assert_allclose(t["weight"].sum(), 1.0)


@pytest.mark.parametrize(
    "p,n_bins,match", [([0.2, 1.5], 10, "probabilities in \\[0, 1\\]"), ([0.2, 0.5], 0, "n_bins must be a positive")]
)
def test_bad_calibration_inputs_raise(p, n_bins, match):
    with pytest.raises(MetricInputError, match=match):
        expected_calibration_error([0, 1], p, n_bins)


def test_reliability_plot_renders():
    rng = np.random.default_rng(4)
    p = rng.random(300)
    y = (rng.random(300) < p).astype(float)
    fig = reliability_plot(y, p, n_bins=10, title="Effusion")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"ECE = {expected_calibration_error(y, p, 10):.3f}" in legend
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
