"""Mask metrics against scikit-learn, and the hematoma volume by hand (the AUROC: test_study_metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, fbeta_score, jaccard_score

from common.metrics import SegmentationCounts, dice, fscore, hematoma_volume_ml, iou


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


def test_hematoma_volume_by_hand() -> None:
    # 1000 voxels of 0.5 x 0.4 mm pixels on slices 5 mm apart: 1000 x 0.2 x 5 mm^3 = 1 ml
    assert hematoma_volume_ml(1000, (0.5, 0.4), 5.0) == pytest.approx(1.0)
    assert hematoma_volume_ml(np.int64(1000), 0.5, 2.0) == pytest.approx(0.5)  # square pixels: one side
    assert hematoma_volume_ml(0, (0.5, 0.5), 5.0) == 0.0
    for bad in (((0.5, 0.0), 5.0), ((0.5, 0.5), 0.0)):
        with pytest.raises(ValueError, match="must be positive"):
            hematoma_volume_ml(10, *bad)
