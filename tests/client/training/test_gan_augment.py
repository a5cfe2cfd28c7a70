"""Stage-2 augmentation: the site's GAN on its training crops, generated slices added at the ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data.dataset import SliceDataset, dataset_labels
from client.training.gan import generate
from client.training.gan_augment import GanAugment, NoGanData, augmented_training_set, crop_tensors, training_crops
from common.config import LABELS
from common.gan import GanConfig
from tests.helpers.cache import hypodensity_cache

CFG = GanConfig(z_dim=8, g_channels=(16, 8), d_channels=(8, 16), n_dis=1, batch_size=4)
HYPO = LABELS.index("hypodensity")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_generated_slices_are_added_at_the_ratio_with_the_markers_label_only():
    real = SliceDataset(hypodensity_cache([0, 1, 0, 1]), np.arange(8))
    aug = GanAugment(CFG, steps=2, ratio=0.5)
    ds, G, added = augmented_training_set(real, aug, seed=0)
    assert added == 4 and len(ds) == 12  # round(0.5 x 8)
    new = dataset_labels(ds)[8:]
    assert sorted(new[:, HYPO].tolist()) == [0, 0, 1, 1]  # half positive
    assert np.isnan(np.delete(new, HYPO, axis=1)).all()  # the other labels: not annotated
    item = ds[8]
    assert item["image"].shape == (32, 32) and item["image"].dtype == torch.uint8
    # a later round loads the stored generator instead of training a new one
    _, again, _ = augmented_training_set(real, aug, seed=5, state=G.state_dict())
    assert torch.equal(generate(again, [0, 1], 2, seed=1)[0], generate(G, [0, 1], 2, seed=1)[0])


def test_zero_ratio_changes_nothing_and_one_class_is_refused():
    real = SliceDataset(hypodensity_cache([0, 1]), np.arange(4))
    ds, _, added = augmented_training_set(real, GanAugment(CFG, steps=1, ratio=0.0), seed=0)
    assert ds is real and added == 0
    only_negative = SliceDataset(hypodensity_cache([0, 0]), np.arange(4))
    with pytest.raises(NoGanData, match="one class of the marker only"):
        crop_tensors(training_crops([only_negative], CFG))
    with pytest.raises(ValueError, match="ratio >= 0"):
        GanAugment(CFG, steps=1, ratio=-1.0)


def test_quality_figures_are_numbers_from_held_out_crops():
    from client.training.gan_augment import gan_quality
    from common.model import build_joint_model
    from common.presets import get_preset

    cache = hypodensity_cache([0, 1, 0, 1, 0, 1])
    train, held = training_crops([SliceDataset(cache, np.arange(6)), SliceDataset(cache, np.arange(6, 12))], CFG)
    _, G, _ = augmented_training_set(SliceDataset(cache, np.arange(6)), GanAugment(CFG, steps=1, ratio=0.1), seed=0)
    model = build_joint_model(get_preset("tiny", image_size=32), seed=0)
    q = gan_quality(G, train, held, model)
    assert q["n_held_out"] == 3 and np.isfinite(q["frechet"]) and q["frechet"] >= 0 and q["memorisation"] > 0
    with pytest.raises(ValueError, match="at least two held-out"):
        gan_quality(G, train, training_crops([SliceDataset(cache, np.arange(0))], CFG)[0], model)
