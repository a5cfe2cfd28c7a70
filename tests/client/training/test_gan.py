"""Local conditional-GAN training: it learns the classes, it is seeded, and its augmentation wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from client.data.crops import HematomaCrops
from client.data.dataset import SliceDataset, dataset_labels, stage_positives
from client.training.gan import augment_with_generated, class_counts, generate, train_gan
from common.config import LABELS
from common.gan import GanConfig, build_gan
from tests.helpers.cache import memory_cache, study_entry

#: 16-px GAN; a high learning rate so that 40 steps separate the classes on two cores.
CFG = GanConfig(z_dim=16, g_channels=(32, 16), d_channels=(16, 32), lr_g=1e-3, lr_d=1e-3, n_dis=1, batch_size=16)
SIDE = CFG.image_size


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def discs(n: int, bright: bool, g: torch.Generator) -> torch.Tensor:
    """A disc (radius 3-5 px, centre jittered) on grey: bright (+0.8) or dark (-0.8), with noise."""
    yy, xx = torch.meshgrid(torch.arange(SIDE * 1.0), torch.arange(SIDE * 1.0), indexing="ij")
    centre = SIDE / 2 + torch.randint(-2, 3, (n, 2), generator=g)
    radius = 3 + torch.randint(0, 3, (n,), generator=g)
    inside = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2 < radius[:, None, None] ** 2
    image = torch.where(inside, torch.tensor(0.8 if bright else -0.8), torch.tensor(0.0))
    return (image + 0.05 * torch.randn(n, SIDE, SIDE, generator=g))[:, None].clamp(-1, 1)


@pytest.fixture(scope="module")
def toy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.cat([discs(64, False, g), discs(64, True, g)]), torch.cat([torch.zeros(64), torch.ones(64)]).long()


def test_conditional_generator_learns_class_dependent_images(toy):
    x, y = toy
    G, D = build_gan(CFG, seed=0)
    result = train_gan(G, D, x, y, CFG, steps=40, seed=0)
    assert len(result.d_losses) == len(result.g_losses) == 40 and np.isfinite(result.d_losses).all()
    # a fixed classifier fitted on the real data only: the midpoint of the two classes' mean intensities
    means = x.mean(dim=(1, 2, 3))
    threshold = (means[y == 0].mean() + means[y == 1].mean()) / 2
    images, classes = generate(G, [0, 1], 50, seed=1)
    predicted = (images.mean(dim=(1, 2, 3)) > threshold).long()
    assert float((predicted == classes).float().mean()) >= 0.75  # chance is 0.5
    untrained, _ = build_gan(CFG, seed=0)
    before = (generate(untrained, [0, 1], 50, seed=1)[0].mean(dim=(1, 2, 3)) > threshold).long()
    assert float((before == classes).float().mean()) < 0.75  # the classes were learnt, not built in


def test_training_and_sampling_are_fixed_by_seed(toy):
    x, y = toy
    runs = []
    for seed in (3, 3, 4):
        G, D = build_gan(CFG, seed=0)
        runs.append((train_gan(G, D, x, y, CFG, steps=3, seed=seed).d_losses, G))
    assert runs[0][0] == runs[1][0] and runs[0][0] != runs[2][0]
    a, ya = generate(runs[0][1], [1, 0], 4, seed=9)
    b, _ = generate(runs[1][1], [1, 0], 4, seed=9)
    assert torch.equal(a, b) and ya.tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and a.shape == (8, 1, SIDE, SIDE)
    c, _ = generate(runs[0][1], [1, 0], 4, seed=10)
    assert not torch.equal(a, c)


def test_train_gan_refuses_an_empty_site():
    G, D = build_gan(CFG, seed=0)
    with pytest.raises(ValueError, match="no crops"):
        train_gan(G, D, torch.zeros(0, 1, SIDE, SIDE), torch.zeros(0, dtype=torch.long), CFG, 1, 0)


def _site(n: int = 6, size: int = 32) -> tuple:
    """A cache of n slices with a square hematoma each; hypodensity 1 on the first, 0 elsewhere."""
    images = np.full((n, size, size), 60, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 10:18, 12:20] = 1
    images[masks > 0] = 150
    labels = np.zeros((n, len(LABELS)), np.float32)
    labels[0, LABELS.index("hypodensity")] = 1
    cache = memory_cache(images, masks, labels, [study_entry("S-a", 0, masks, [1, 0, 0, 0, None])])
    return cache, SliceDataset(cache, np.arange(n))


def test_augmentation_adds_generated_slices_at_the_ratio_in_slice_format():
    cache, real = _site()
    carriers = HematomaCrops(cache, np.arange(len(real)), CFG)
    G, _ = build_gan(CFG, seed=0)
    mixed = augment_with_generated(real, carriers, G, ratio=1.5, seed=0, positive_fraction=0.5)
    assert isinstance(mixed, ConcatDataset) and len(mixed) == len(real) + 9
    fake = mixed.datasets[1]
    hypo = fake.labels()[:, LABELS.index("hypodensity")]
    assert sorted(hypo.tolist()) == [0.0] * 5 + [1.0] * 4  # class_counts(9, 0.5) = (5, 4)
    assert np.isnan(np.delete(fake.labels(), LABELS.index("hypodensity"), axis=1)).all()
    item, carrier = mixed[len(real)], real[0]
    assert item.keys() == carrier.keys() and item["image"].dtype == torch.uint8
    outside = carrier["mask"] == 0
    assert torch.equal(item["image"][outside], carrier["image"][outside])  # only the hematoma is generated
    assert not torch.equal(item["image"][~outside], carrier["image"][~outside])
    assert dataset_labels(mixed).shape == (len(mixed), len(LABELS))  # the loaders' helpers see both parts
    assert stage_positives(mixed, stage=2).sum() == 1 + 4
    assert augment_with_generated(real, carriers, G, ratio=0.0, seed=0) is real
    pooled = augment_with_generated(ConcatDataset([real, real]), carriers, G, ratio=0.5, seed=0)
    assert len(pooled.datasets) == 3 and len(pooled) == 2 * len(real) + 6


def test_class_counts():
    assert class_counts(9, 0.5) == (5, 4) and class_counts(4, 0.0) == (4, 0)
    with pytest.raises(ValueError):
        class_counts(4, 1.5)


@pytest.mark.slow
def test_site_pipeline_crops_train_generate_augment_and_measure(synthetic_root, tmp_path):
    """A generated site end to end: training-split crops, a few GAN steps, augmentation, figures."""
    from client.data.dataset import split_slices
    from common.gan import get_gan_preset
    from common.gan_metrics import memorisation, save_grid
    from tests.helpers.cache import synthetic_caches

    cache = synthetic_caches(synthetic_root)[0]
    cfg = get_gan_preset("tiny", batch_size=8)
    splits = split_slices(cache, seed=0)
    train, held_out = HematomaCrops(cache, splits["train"], cfg), HematomaCrops(cache, splits["test"], cfg)
    assert len(train) and set(train.labels()) == {0, 1}
    x, y = train.tensors()
    G, D = build_gan(cfg, seed=0)
    assert len(train_gan(G, D, x, y, cfg, steps=2, seed=0).g_losses) == 2
    mixed = augment_with_generated(SliceDataset(cache, splits["train"]), train, G, ratio=0.25, seed=0)
    assert mixed[len(mixed) - 1]["image"].shape == (64, 64)
    fake, classes = generate(G, [0, 1], 8, seed=0)
    assert memorisation(fake, x, held_out.tensors()[0]).ratio > 0
    grid = {c: fake[classes == c] for c in (0, 1)}
    real = {c: x[y == c][:8] for c in (0, 1)}
    assert save_grid(tmp_path / "grid.png", grid, real, ["no hypodensity", "hypodensity"]).stat().st_size > 0
