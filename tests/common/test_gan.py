"""The conditional SNGAN's networks: spectral normalisation, conditioning, config, hinge loss."""

from __future__ import annotations

import pytest
import torch

from common.gan import (
    GAN_PRESETS,
    GanConfig,
    build_gan,
    d_hinge_loss,
    g_hinge_loss,
    gan_state_dict,
    get_gan_preset,
    load_gan_state_dict,
    spectral_norms,
    with_unit_power_vectors,
)
from common.records import GAN_D_PREFIX, GAN_G_PREFIX, record_to_state, state_to_record

#: 16-px networks: the smallest that exercise every block kind.
CFG = GanConfig(z_dim=8, g_channels=(16, 8), d_channels=(8, 16), batch_size=4)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_spectral_norm_keeps_every_discriminator_weight_near_one():
    _, D = build_gan(CFG, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in D.parameters():  # large raw weights: without SN their norms are far from 1
            p.mul_(5.0)
        for _ in range(10):  # each train-mode forward runs one power iteration
            D(torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 1, 0, 1]))
    norms = spectral_norms(D)
    raw = {
        name: float(
            torch.linalg.svdvals(sub.parametrizations.weight.original.detach().reshape(sub.weight.shape[0], -1)).max()
        )
        for name, sub in D.named_modules()
        if name in norms
    }
    assert len(norms) == 3 * len(CFG.d_channels) + 2  # 3 convs per block, the linear and the embedding
    assert all(abs(v - 1.0) < 0.05 for v in norms.values()), norms
    assert all(v > 2.0 for v in raw.values()), raw  # the check would see an unnormalised weight


def test_generator_makes_images_in_tanh_range_and_depends_on_the_class():
    G, _ = build_gan(CFG, seed=0)
    G.eval()
    z = torch.randn(3, CFG.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.ones(3, dtype=torch.long))
    assert a.shape == (3, 1, CFG.image_size, CFG.image_size)
    assert a.abs().max() <= 1.0
    torch.nn.init.normal_(G.blocks[0].bn1.gain.weight)  # a class-specific gain: classes must differ
    with torch.no_grad():
        c, d = G(z, torch.zeros(3, dtype=torch.long)), G(z, torch.ones(3, dtype=torch.long))
    assert torch.equal(a, b)  # identical class embeddings at init give identical images
    assert not torch.allclose(c, d)


def test_projection_discriminator_scores_depend_on_the_label():
    _, D = build_gan(CFG, seed=0)
    D.eval()  # no power iteration between the calls: the same normalised weights throughout
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s0, s1 = D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 1]))
    assert s0.shape == (2,)
    h = D.features(x)
    expected_gap = ((D.embed.weight[0] - D.embed.weight[1]) * h).sum(dim=1)
    torch.testing.assert_close(s0 - s1, expected_gap.detach(), rtol=1e-4, atol=1e-4)


def test_build_gan_is_fixed_by_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    G1, D1 = build_gan(CFG, seed=5)
    after = torch.rand(1)
    G2, _ = build_gan(CFG, seed=5)
    G3, _ = build_gan(CFG, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(G1.state_dict().values(), G2.state_dict().values()))
    assert not torch.equal(G1.fc.weight, G3.fc.weight)


def test_hinge_losses_match_a_hand_computation():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-3)=0, relu(1+0)=1 -> 0.5
    assert float(d_hinge_loss(real, fake)) == pytest.approx(0.75)
    assert float(g_hinge_loss(fake)) == pytest.approx(1.5)


def test_config_sizes_round_trip_and_validation():
    assert {n: c.image_size for n, c in GAN_PRESETS.items()} == {"tiny": 32, "small": 64, "paper": 128}
    cfg = get_gan_preset("small", n_dis=2)
    assert GanConfig.from_dict(cfg.to_dict()) == cfg and cfg.n_dis == 2
    with pytest.raises(ValueError, match="cannot halve"):
        GanConfig(g_channels=(8,), d_channels=(8, 8, 8, 8))  # 8 px cannot be halved 4 times
    with pytest.raises(ValueError, match="marker"):
        GanConfig(marker="expansion")
    with pytest.raises(KeyError, match="unknown GAN config keys"):
        GanConfig.from_dict({"z": 3})
    with pytest.raises(KeyError, match="unknown GAN preset"):
        get_gan_preset("huge")


def test_gan_state_round_trips_through_a_record_with_spectral_norm_intact():
    """What a GAN round exchanges (raw weights + power-iteration vectors) rebuilds the same networks."""
    G, D = build_gan(CFG, seed=0)
    D.train()
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    D(x, y)  # one power iteration: u and v move away from their initial values
    state = gan_state_dict(G, D)
    assert set(state) == {GAN_G_PREFIX + k for k in G.state_dict()} | {GAN_D_PREFIX + k for k in D.state_dict()}
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    assert any(k.endswith("parametrizations.weight.0._u") for k in state)
    G2, D2 = build_gan(CFG, seed=1)
    load_gan_state_dict(G2, D2, record_to_state(state_to_record(state)))
    D.eval(), D2.eval(), G.eval(), G2.eval()
    z = torch.randn(4, CFG.z_dim)
    with torch.no_grad():
        assert torch.equal(D(x, y), D2(x, y)) and torch.equal(G(z, y), G2(z, y))


def test_power_vectors_of_a_mean_are_scaled_back_to_unit_length():
    (_, D1), (_, D2) = build_gan(CFG, seed=0), build_gan(CFG, seed=1)
    s1, s2 = D1.state_dict(), D2.state_dict()
    mean = {k: (s1[k] + s2[k]) / 2 for k in s1}
    fixed = with_unit_power_vectors(mean)
    vectors = [k for k in mean if k.endswith(("._u", "._v"))]
    assert vectors and any(float(mean[k].norm()) < 0.99 for k in vectors)  # a mean of unit vectors is shorter
    for k in mean:
        if k in vectors:
            assert float(fixed[k].norm()) == pytest.approx(1.0, abs=1e-6)
            assert torch.allclose(fixed[k], mean[k] / mean[k].norm())
        else:
            assert torch.equal(fixed[k], mean[k])
