"""Metrics against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, fbeta_score, jaccard_score, roc_auc_score

from common.config import MARKERS
from common.metrics import (
    SegmentationCounts,
    dice,
    fscore,
    iou,
    roc_auc_per_marker,
    study_scores,
    volume_ml,
)

NAN = float("nan")


@pytest.fixture
def masks() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.random((5, 16, 16)) > 0.7, rng.random((5, 16, 16)) > 0.6


def test_mask_metrics_match_sklearn(masks) -> None:
    pred, target = masks
    t, p = target.ravel(), pred.ravel()
    assert dice(pred, target) == pytest.approx(f1_score(t, p))
    assert iou(pred, target) == pytest.approx(jaccard_score(t, p))
    assert fscore(pred, target) == pytest.approx(f1_score(t, p))
    assert fscore(pred, target, beta=2.0) == pytest.approx(fbeta_score(t, p, beta=2.0))


def test_float_and_tensor_masks(masks) -> None:
    pred, target = masks
    assert dice(torch.tensor(pred, dtype=torch.float32), target.astype(np.uint8)) == pytest.approx(dice(pred, target))


def test_empty_masks() -> None:
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert dice(empty, empty) == iou(empty, empty) == fscore(empty, empty) == 1.0
    assert dice(empty, full) == iou(full, empty) == 0.0


def test_segmentation_counts_global_and_per_study(masks) -> None:
    pred, target = masks
    ids = ["a", "a", "b", "c", "c"]
    acc = SegmentationCounts()
    acc.update(pred[:2], target[:2], ids[:2])
    acc.update(torch.tensor(pred[2:]), torch.tensor(target[2:]), ids[2:])
    g = acc.global_scores()
    assert g["dice"] == pytest.approx(f1_score(target.ravel(), pred.ravel()))
    assert g["iou"] == pytest.approx(jaccard_score(target.ravel(), pred.ravel()))
    per = [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert acc.per_study_scores()["dice"] == pytest.approx(np.mean([dice(pred[s], target[s]) for s in per]))
    assert acc.per_study_scores()["iou"] == pytest.approx(np.mean([iou(pred[s], target[s]) for s in per]))
    assert np.isnan(SegmentationCounts().per_study_scores()["dice"])


def test_roc_auc_per_marker_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((40, 4)) > 0.5).astype(float)
    s = rng.random((40, 4))
    y[:5, 0] = NAN
    y[:, 3] = 0.0  # one class only
    y[:, 2] = NAN
    aucs = roc_auc_per_marker(y, s)
    assert list(aucs) == list(MARKERS)
    assert aucs["hypodensity"] == pytest.approx(roc_auc_score(y[5:, 0], s[5:, 0]))
    assert aucs["irregular_margin"] == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]))
    assert np.isnan(aucs["blend_sign"]) and np.isnan(aucs["fluid_level"])
    assert list(roc_auc_per_marker(y[:, :1], s[:, :1], names=["x"])) == ["x"]


def test_study_scores_by_hand() -> None:
    scores = np.array([0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.8])
    ids = ["s2", "s2", "s1", "s1", "s1", "s1", "s3"]
    studies, best = study_scores(scores, ids)
    assert studies.tolist() == ["s1", "s2", "s3"]
    np.testing.assert_allclose(best, [0.5, 0.9, 0.8])
    _, top2 = study_scores(scores, ids, how="mean_top_k", k=2)
    np.testing.assert_allclose(top2, [(0.5 + 0.4) / 2, (0.9 + 0.1) / 2, 0.8])
    _, cols = study_scores(np.stack([scores, 1 - scores], axis=1), ids)
    np.testing.assert_allclose(cols, [[0.5, 0.8], [0.9, 0.9], [0.8, 0.2]])
    with pytest.raises(ValueError):
        study_scores(scores, ids, how="median")


def test_volume_ml() -> None:
    mask = np.zeros((10, 20, 20), bool)
    mask[:5, :10, :20] = True  # 1000 voxels
    assert volume_ml(mask, 1.0) == pytest.approx(1.0)
    assert volume_ml(mask.astype(np.uint8), (5.0, 0.5, 0.5)) == pytest.approx(1.25)
    with pytest.raises(ValueError):
        volume_ml(mask, 0.0)
