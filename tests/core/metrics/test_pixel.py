from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou
from torchmetrics.functional.classification import binary_f1_score, binary_jaccard_index

from loupe.core.metrics import MetricInputError, best_threshold_f1, mean_pixel_scores, pixel_f1_iou, pixel_scores


def test_pixel_hand_case():
    gt = np.zeros((4, 4))
    gt[0, :4] = 1  # 4 manipulated pixels
    score = np.zeros((4, 4))
    score[0, :3] = 0.9  # 3 TP, 1 FN
    score[1, :2] = 0.6  # 2 FP
    score[2, 0] = 0.4  # below threshold
    f1, iou = pixel_f1_iou(score, gt, threshold=0.5)
    assert f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert iou == pytest.approx(3 / 6)
    # best threshold: 0.9 gives TP 3, FP 0, FN 1 -> F1 6/7
    assert best_threshold_f1(score, gt) == (pytest.approx(6 / 7), 0.9)


@pytest.mark.parametrize(
    "gt_on,pred_on,expected",
    [(False, False, (1.0, 1.0)), (False, True, (0.0, 0.0)), (True, False, (0.0, 0.0))],
)
def test_empty_conventions(gt_on, pred_on, expected):
    gt, pred = np.zeros((3, 3), bool), np.zeros((3, 3), bool)
    gt[1, 1], pred[0, 0] = gt_on, pred_on
    assert pixel_f1_iou(pred, gt) == expected


def test_empty_gt_best_threshold_predicts_nothing():
    assert best_threshold_f1(np.full((2, 2), 0.7), np.zeros((2, 2))) == (1.0, float("inf"))


def _batch(seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    gts = (rng.random((n, 16, 16)) < 0.2).astype(float)
    gts[0] = 0  # one authentic image
    scores = np.clip(gts * 0.4 + rng.random((n, 16, 16)) * 0.7, 0, 1)
    return scores, gts


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_monai_with_empty_counted(seed):
    scores, gts = _batch(seed)
    scores[0] = 0.0  # empty prediction on the authentic image -> 1 by both conventions
    pred = torch.tensor(scores >= 0.5)[:, None].float()  # MONAI wants [B, C, H, W]
    gt = torch.tensor(gts)[:, None]
    iou = compute_iou(pred, gt, ignore_empty=False)[:, 0].numpy()
    dice = compute_dice(pred, gt, ignore_empty=False)[:, 0].numpy()
    table = pixel_scores(scores, gts, threshold=0.5)
    np.testing.assert_allclose(table["iou"], iou, rtol=1e-6)
    np.testing.assert_allclose(table["f1"], dice, rtol=1e-6)


def test_matches_torchmetrics_per_image():
    scores, gts = _batch(2)
    for score, gt in zip(scores[1:], gts[1:], strict=True):
        f1, iou = pixel_f1_iou(torch.tensor(score), torch.tensor(gt), threshold=0.45)
        t, g = torch.tensor(score), torch.tensor(gt).long()
        np.testing.assert_allclose(f1, binary_f1_score(t, g, threshold=0.45).item(), rtol=1e-6)
        np.testing.assert_allclose(iou, binary_jaccard_index(t, g, threshold=0.45).item(), rtol=1e-6)


def test_best_threshold_matches_brute_force():
    scores, gts = _batch(3)
    for score, gt in zip(scores[1:], gts[1:], strict=True):
        score = np.round(score, 2)  # ties
        brute = max(pixel_f1_iou(score, gt, thr)[0] for thr in np.unique(score))
        best, thr = best_threshold_f1(score, gt)
        assert best == pytest.approx(brute)
        assert pixel_f1_iou(score, gt, thr)[0] == pytest.approx(best)
        assert best >= pixel_f1_iou(score, gt, 0.5)[0]


def test_batch_of_mixed_sizes_and_skip_empty():
    gts = [np.zeros((2, 2)), np.eye(3)]
    preds = [np.zeros((2, 2)), np.eye(3) * 0.8]
    table = pixel_scores(preds, gts)
    assert table["image"].tolist() == [0, 1] and table["gt_pixels"].tolist() == [0, 3]
    assert mean_pixel_scores(preds, gts) == {"f1": 1.0, "iou": 1.0, "best_f1": 1.0, "n_images": 2}
    preds[1] = np.eye(3)[::-1] * 0.8  # only the centre pixel right: F1 1/3, IoU 1/5
    m = mean_pixel_scores(preds, gts, skip_empty_gt=True)
    assert m["n_images"] == 1
    assert m["f1"] == pytest.approx(1 / 3) and m["iou"] == pytest.approx(1 / 5)


def test_boolean_prediction_ignores_threshold():
    gt = np.array([[1, 0], [0, 1]])
    pred = np.array([[True, False], [False, False]])
    assert pixel_f1_iou(pred, gt, threshold=2.0) == (pytest.approx(2 / 3), 0.5)


@pytest.mark.parametrize(
    "pred,gt,match",
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), "shape"),
        (np.zeros((2, 2)), np.full((2, 2), 0.5), "only 0/1"),
        (np.full((2, 2), np.nan), np.zeros((2, 2)), "NaN"),
    ],
)
def test_bad_pixel_inputs_raise(pred, gt, match):
    with pytest.raises(MetricInputError, match=match):
        pixel_f1_iou(pred, gt)
