"""The report's GAN section: Fréchet distance and memorisation ratio per site, their mean and
spread per seed, the picture grid and ``gan_quality.json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.data.dataset import SliceDataset
from client.training.gan_augment import GanAugment, augmented_training_set, quality_figures
from common.config import LABELS
from common.gan import GanConfig
from common.model import build_joint_model
from common.presets import get_preset
from simulations.report.gan_section import crops_of, draw_grid, measure, per_seed, write_gan
from simulations.report.html import section_parts
from tests.helpers.cache import hypodensity_cache

CFG = GanConfig(z_dim=8, g_channels=(16, 8), d_channels=(8, 16), n_dis=1, batch_size=4)
HYPO = LABELS.index("hypodensity")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model():
    return build_joint_model(get_preset("tiny", image_size=32), seed=0)


def test_generated_copies_of_training_crops_give_ratio_zero_and_identical_sets_no_distance(model):
    crops = torch.rand(24, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, held = crops[:12], crops[12:]
    copies = quality_figures(train.clone(), train, held, model)
    assert copies["memorisation"] == 0.0 and copies["n_held_out"] == 12
    same = quality_figures(held.clone(), train, held, model)
    far = quality_figures(torch.zeros_like(held), train, held, model)
    assert same["frechet"] < 1e-6 * far["frechet"] + 1e-9 and far["frechet"] > 0
    # fresh samples of the crops' distribution sit as near the training as the held-out crops
    fresh = torch.rand(200, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert quality_figures(fresh, train, held, model)["memorisation"] == pytest.approx(1.0, abs=0.05)


def test_per_seed_is_the_mean_and_spread_over_sites():
    rows = [
        {"scenario": "natural", "method": "fedavg", "seed": s, "site": f"site-{k}", "frechet": f, "memorisation": m}
        | {"n_held_out": 10.0}
        for s, k, f, m in ((0, 1, 2.0, 0.9), (0, 2, 4.0, 1.1), (0, 3, 9.0, 1.0), (1, 1, 3.0, 0.8), (1, 2, 5.0, 1.2))
    ]
    seed0, seed1 = per_seed(rows)
    assert (seed0["seed"], seed0["sites"], seed1["sites"]) == (0, 3, 2)
    assert seed0["frechet"] == pytest.approx(5.0) and seed0["frechet_sd"] == pytest.approx(np.std([2, 4, 9], ddof=1))
    assert seed1["memorisation"] == pytest.approx(1.0) and seed1["memorisation_sd"] == pytest.approx(
        np.std([0.8, 1.2], ddof=1)
    )


def test_measure_a_trained_generator_on_capped_crop_sets_and_draw_its_grid(tmp_path, model):
    cache = hypodensity_cache([0, 1] * 6)
    train, held = SliceDataset(cache, np.arange(12)), SliceDataset(cache, np.arange(12, 24))
    _, G, _ = augmented_training_set(train, GanAugment(CFG, steps=1, ratio=0.1), seed=0)
    images, labels = crops_of([held], CFG, limit=4, seed=0)
    assert images.shape == (4, 1, CFG.image_size, CFG.image_size) and labels.shape == (4,)
    got = measure(G, model, [train], [held], CFG, limit=4)
    assert got["n_held_out"] == 4 and got["n_train"] == 4
    assert np.isfinite(got["frechet"]) and got["frechet"] >= 0 and got["memorisation"] > 0
    assert measure(G, model, [train], [SliceDataset(cache, np.arange(0))], CFG) is None
    path = draw_grid(tmp_path / "grid.png", G, [held], CFG)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_written_with_rows_only_and_the_grid_embedded_with_its_note(tmp_path):
    assert write_gan(tmp_path, [], {}) is None and not (tmp_path / "gan_quality.json").exists()
    rows = [
        {"scenario": "natural", "method": "pooled", "seed": 0, "site": "pooled", "frechet": 1.5}
        | {"memorisation": 0.97, "n_held_out": 8.0, "n_train": 8.0}
    ]
    grid = tmp_path / "natural_gan_grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n")
    section = write_gan(
        tmp_path, rows, {"natural": {"path": str(grid), "method": "pooled", "seed": 0, "site": "pooled"}}
    )
    doc = json.loads((tmp_path / "gan_quality.json").read_text())
    assert doc["sites"] == rows and doc["per_seed"][0]["frechet"] == 1.5
    assert doc["grids"]["natural"]["path"] == "natural_gan_grid.png"  # a file name, never a full path
    page = "".join(section_parts(section))
    assert "1.500" in page and "0.970" in page and "data:image/png;base64," in page
    assert "exists only because the simulation" in page


def test_a_federated_sites_generator_is_read_back_from_its_store(tmp_path):
    from client.federation.site_gan import GENERATOR
    from client.federation.store import SiteStore
    from client.training.gan import generate
    from simulations.runner import stored_generator

    cache = hypodensity_cache([0, 1] * 3)
    aug = GanAugment(CFG, steps=1, ratio=0.1)
    _, G, _ = augmented_training_set(SliceDataset(cache, np.arange(12)), aug, seed=3)
    store = SiteStore(tmp_path / "federation" / "site-01" / "run")
    assert stored_generator(store, aug) is None and stored_generator(None, aug) is None  # no GAN trained there
    store.save(GENERATOR, G.state_dict())  # what the site's train handler keeps (client.federation.site_gan)
    again = stored_generator(store, aug)
    assert torch.equal(generate(again, [0, 1], 2, seed=1)[0], generate(G, [0, 1], 2, seed=1)[0])
