"""A site's radiomics features: training studies on their reference masks, held-out studies on the
U-Net's, study keys and labels as the evaluation's, the U-Net's Dice beside them, and the metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data.dataset import SliceDataset
from client.radiomics import (
    StudyFeatures,
    predicted_features,
    radiomics_metrics,
    reference_features,
    study_outputs,
)
from common.config import LABELS, MARKERS
from common.radiomics import FEATURE_NAMES, study_features
from tests.helpers.cache import memory_cache, study_entry

S = 32
ROWS, COLS = np.mgrid[:S, :S]
DISK = (ROWS - 16) ** 2 + (COLS - 16) ** 2 <= 6**2


class ThresholdUNet(torch.nn.Module):
    """A stand-in U-Net whose mask is the clot (pixels above 200 of 255): a perfect segmenter here."""

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 200 / 255) * 100


def two_studies() -> SliceDataset:
    """Study A: two slices, a dense disk on the first (mask known); study B: one slice with the same
    disk but no reference mask (its labels NaN); study C: no hematoma at all, mask known."""
    images = np.zeros((4, S, S), np.uint8)
    images[:, 4:28, 4:28] = 90  # brain
    images[0][DISK] = 220
    images[2][DISK] = 220
    masks = np.zeros_like(images)
    masks[0][DISK] = 1
    labels = np.zeros((4, len(LABELS)), np.float32)
    labels[0] = [1, 0, np.nan, 0, np.nan]
    labels[2] = np.nan
    studies = [
        study_entry("A", 0, masks[0:2], [1.0, 0.0, None, 0.0, None], pixel_mm=(0.8, 0.8)),
        study_entry("B", 2, masks[2:3], [None] * 5, has_mask=False),
        study_entry("C", 3, masks[3:4], [0.0, 0.0, 0.0, 0.0, None]),
    ]
    for order, entry in enumerate(studies):
        entry["patient_order"] = order
    cache = memory_cache(images, masks, labels, studies, min_mask_pixels=10)
    return SliceDataset(cache, np.arange(4))


def test_training_studies_use_their_reference_masks_only():
    ds = two_studies()
    sf = reference_features(ds)
    assert sf.studies.tolist() == ["site-test-cache/A", "site-test-cache/C"]  # B has no reference mask
    assert sf.patients.tolist() == ["site-test/site-test#0", "site-test/site-test#2"]
    assert sf.sites.tolist() == ["site-test", "site-test"]
    assert sf.labels[0] == pytest.approx([1, 0, np.nan, 0], nan_ok=True)
    expected = study_features(np.asarray(ds.cache.images[0:2]), np.asarray(ds.cache.masks[0:2]), (0, 80), 0.8, 5.0, 10)
    assert sf.features[0] == pytest.approx(expected, nan_ok=True)
    assert sf.empty.tolist() == [False, True] and sf.n_slices == 3
    assert np.isnan(sf.dice_counts).all()  # reference masks: no Dice of anything
    assert len(sf.annotated()) == 2 and len(sf.subset(np.array([False, True])).annotated()) == 1


def test_held_out_studies_use_the_unets_masks_and_carry_its_dice():
    ds = two_studies()
    sf = predicted_features(ds, ThresholdUNet(), batch_size=3)
    assert sf.studies.tolist() == [f"site-test-cache/{k}" for k in "ABC"]
    ref = reference_features(ds)
    assert sf.features[0] == pytest.approx(ref.features[0], nan_ok=True)  # a perfect U-Net: the same features
    assert sf.features[1][FEATURE_NAMES.index("hu_p50")] == pytest.approx(220 / 255 * 80)
    assert sf.dice_counts[0] == pytest.approx([DISK.sum(), 0, 0]) and np.isnan(sf.dice_counts[1]).all()
    assert sf.volumes[0] == pytest.approx([DISK.sum() * 0.64 * 5 / 1000] * 2)
    assert sf.empty.tolist() == [False, False, True]


def test_metrics_are_the_evaluations_study_metrics(tmp_path):
    sf = predicted_features(two_studies(), ThresholdUNet())
    logits = np.array([[2.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0, -1.0]])
    m = radiomics_metrics(sf, logits)
    assert m["auc_study/hypodensity"] == 1.0 and np.isnan(m["auc_study/irregular_margin"])  # A 0, C 0: one class
    assert m["macro_auc_study"] == 1.0 and m["n_studies"] == 3 and m["n_studies_fallback"] == 1
    assert m["dice"] == pytest.approx(1.0) and m["volume_mae_ml"] == pytest.approx(0.0)
    outputs = m["arrays"]["studies"]
    assert outputs.names == tuple(MARKERS) and outputs.logits == pytest.approx(logits)
    assert m["arrays"]["dice_counts"] == {"site-test-cache/A": (int(DISK.sum()), 0, 0), "site-test-cache/C": (0, 0, 0)}
    assert study_outputs(sf, logits).fallback.tolist() == [False, False, True]
    sf.save(tmp_path / "f.npz")
    back = StudyFeatures.load(tmp_path / "f.npz")
    assert back is not None and back.studies.tolist() == sf.studies.tolist()
    assert back.features == pytest.approx(sf.features, nan_ok=True) and back.n_slices == sf.n_slices
    assert StudyFeatures.load(tmp_path / "missing.npz") is None
