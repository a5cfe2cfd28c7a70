"""Fréchet distance, memorisation ratio and the picture grid of generated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.gan_metrics import (
    backbone_extractor,
    frechet_distance,
    frechet_distance_of,
    memorisation,
    nearest_distances,
    save_grid,
)


def test_frechet_distance_is_zero_for_identical_sets():
    x = np.random.default_rng(0).normal(size=(200, 5))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_1d_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(2.0, 1.5, size=500), rng.normal(-1.0, 0.5, size=400)
    # 1-D: (mu_a - mu_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b = (mu_a - mu_b)^2 + (s_a - s_b)^2
    hand = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(hand, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(3.0**2 + 1.0**2, rel=0.15)  # the population value


def test_frechet_distance_grows_with_a_mean_shift_by_its_squared_length():
    x = np.random.default_rng(2).normal(size=(300, 4))
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_uses_the_given_extractor():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(64, 1, 8, 8, generator=g), torch.rand(64, 1, 8, 8, generator=g) + 1.0
    mean_feature = lambda x: x.mean(dim=(1, 2, 3))[:, None]  # noqa: E731
    d = frechet_distance_of(mean_feature, real, fake, batch_size=16)
    hand = frechet_distance(real.mean(dim=(1, 2, 3)).numpy(), fake.mean(dim=(1, 2, 3)).numpy())
    assert d == pytest.approx(hand, rel=1e-9) and d > 0.9


def test_memorisation_ratio_sees_copies_and_not_fresh_samples():
    g = torch.Generator().manual_seed(0)
    train, held_out = torch.randn(200, 64, generator=g), torch.randn(200, 64, generator=g)
    copies = train[:100] + 0.01 * torch.randn(100, 64, generator=g)
    fresh = torch.randn(100, 64, generator=g)
    assert memorisation(copies, train, held_out).ratio < 0.1
    assert memorisation(fresh, train, held_out).ratio == pytest.approx(1.0, abs=0.1)


def test_memorisation_compares_equal_sized_reference_sets():
    g = torch.Generator().manual_seed(1)
    train, held_out = torch.randn(400, 32, generator=g), torch.randn(40, 32, generator=g)
    fresh = torch.randn(100, 32, generator=g)
    m = memorisation(fresh, train, held_out)
    assert m.n_reference == 40
    assert m.ratio == pytest.approx(1.0, abs=0.15)  # without the cut, 10x more train crops look closer


def test_nearest_distances_by_hand():
    q, r = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    np.testing.assert_allclose(nearest_distances(q, r, chunk=1), [1.0, 4.0])


def test_backbone_extractor_gives_one_feature_row_per_image():
    from common.model import build_joint_model
    from common.presets import get_preset

    model = build_joint_model(get_preset("tiny"), seed=0)
    feats = backbone_extractor(model)(torch.rand(2, 1, 16, 16) * 2 - 1)
    assert feats.shape == (2, model.classifier.backbone.out_features)


def test_save_grid_writes_a_png_with_a_row_per_class(tmp_path):
    import matplotlib.image

    g = torch.Generator().manual_seed(0)
    gen = {0: torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, 1: torch.rand(4, 1, 8, 8, generator=g)}
    real = {0: torch.rand(2, 1, 8, 8, generator=g) * 2 - 1}
    path = save_grid(tmp_path / "grid" / "gan.png", gen, real, ["no hypodensity", "hypodensity"], n_columns=4)
    one = save_grid(tmp_path / "one.png", {0: gen[0]}, {}, ["no hypodensity", "hypodensity"], n_columns=4)
    two, single = matplotlib.image.imread(path), matplotlib.image.imread(one)
    assert two.shape[0] > single.shape[0]  # a second class row makes the figure taller
    assert two.shape[1] == single.shape[1]
