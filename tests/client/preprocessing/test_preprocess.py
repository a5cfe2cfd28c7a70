"""Preprocessing (paper §4.1): window maths, median denoising, skull removal on a synthetic head,
centring, resizing, and the whole pipeline with each step switched off in turn (§5.1.1)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from client.preprocessing.pipeline import (
    BONE_HU,
    PreprocessedVolume,
    apply_window,
    brain_centre_shift,
    brain_mask,
    centre_brain,
    denoise,
    preprocess_volume,
    resize_slices,
    strip_skull,
    to_input_grid,
    to_uint8,
    translate,
)
from common.config import AIR_HU, PreprocessConfig

BRAIN_HU, BLOB_HU, SKULL_HU, SCALP_HU = 35.0, 70.0, 1000.0, 40.0


def synthetic_head(
    k: int = 6,
    n: int = 256,
    centre: tuple[float, float] | None = None,
    axes: tuple[float, float] = (95.0, 78.0),
    skull: float = 9.0,
    scalp: float = 7.0,
    blob: tuple[float, float, float] | None = None,
    gap: int = 0,
    gap_slices=(),
    noise: float = 4.0,
    seed: int = 0,
):
    """An HU volume: brain ellipse (35 HU) inside a bone ring (1000 HU) inside a scalp ring (40 HU)
    in air, the ellipse shrinking towards both ends; a 70 HU hematoma disc ``blob = (y, x, radius)``.

    ``gap`` opens the skull ring over that many pixels (filled with scalp) on ``gap_slices``.
    Returns ``hu [k, n, n]`` and bool ``brain`` (the true brain), ``inside`` (inside the skull's
    outer edge), ``blob`` masks of the same shape.
    """
    rng = np.random.default_rng(seed)
    cy, cx = centre if centre is not None else ((n - 1) / 2, (n - 1) / 2)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    hu = np.full((k, n, n), AIR_HU, dtype=np.float32)
    brain, inside, blob_mask = (np.zeros((k, n, n), dtype=bool) for _ in range(3))
    for i in range(k):
        s = 0.7 + 0.3 * np.sin(np.pi * (i + 1) / (k + 1))
        ay, ax = axes[0] * s, axes[1] * s
        r = np.hypot((yy - cy) / ay, (xx - cx) / ax)
        t_skull, t_scalp = skull / ay, scalp / ay
        brain[i] = r < 1
        inside[i] = r < 1 + t_skull
        scalp_ring = r < 1 + t_skull + t_scalp
        sl = np.where(brain[i], BRAIN_HU, np.where(inside[i], SKULL_HU, np.where(scalp_ring, SCALP_HU, AIR_HU)))
        if gap and i in gap_slices:
            sl[(~brain[i]) & inside[i] & (np.abs(xx - cx) < gap / 2) & (yy < cy)] = SCALP_HU
        if blob is not None:
            blob_mask[i] = np.hypot(yy - blob[0], xx - blob[1]) < blob[2]
            sl[blob_mask[i]] = BLOB_HU
        hu[i] = sl
    hu += rng.normal(0.0, noise, hu.shape).astype(np.float32)
    return hu, brain, inside, blob_mask


def centroid(m: np.ndarray) -> np.ndarray:
    idx = np.argwhere(m)
    return idx[:, -2:].mean(axis=0)


# ------------------------------------------------------------------------------------------------
# Window


def test_window_maps_a_to_0_b_to_255_exactly():
    hu = np.array([-1000.0, -1.0, 0.0, 20.0, 40.0, 80.0, 81.0, 3000.0], dtype=np.float32)
    out = apply_window(hu, (0.0, 80.0))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 63.75, 127.5, 255.0, 255.0, 255.0])


def test_window_any_interval_midpoint_is_127_5():
    a, b = -20.0, 100.0
    out = apply_window(np.array([a - 5, a, (a + b) / 2, b, b + 5], dtype=np.float32), (a, b))
    np.testing.assert_array_equal(out, [0.0, 0.0, 127.5, 255.0, 255.0])
    np.testing.assert_allclose(apply_window(np.array([10.0], np.float32), (a, b)), [255 * 30 / 120], rtol=1e-6)


def test_window_rejects_empty_interval():
    with pytest.raises(ValueError):
        apply_window(np.zeros(3, np.float32), (80.0, 80.0))


def test_to_uint8_rounds_and_clips():
    out = to_uint8(np.array([-3.0, 0.4, 0.6, 127.5, 254.6, 300.0], dtype=np.float32))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 1, 128, 255, 255])


# ------------------------------------------------------------------------------------------------
# Denoise


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_denoise_3x3_is_an_exact_per_slice_median(dtype):
    rng = np.random.default_rng(1)
    img = (rng.random((3, 37, 52)) * 255).astype(dtype)
    expected = ndi.median_filter(img, size=(1, 3, 3), mode="nearest")
    out = denoise(img, 3)
    assert out.dtype == img.dtype
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[1], denoise(img[1], 3))  # slices never mix


def test_denoise_other_sizes_and_identity():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (2, 30, 30)).astype(np.uint8)
    np.testing.assert_array_equal(denoise(img, 5), ndi.median_filter(img, size=(1, 5, 5), mode="nearest"))
    np.testing.assert_array_equal(denoise(img, 1), img)


def test_denoise_reduces_noise_on_a_flat_region_and_keeps_a_step_edge():
    rng = np.random.default_rng(3)
    flat = 100.0 + rng.normal(0.0, 10.0, (64, 64))
    spikes = rng.random((64, 64)) < 0.03
    flat[spikes] = rng.choice([0.0, 255.0], spikes.sum())
    flat = flat.astype(np.float32)
    out = denoise(flat, 3)
    inner = (slice(2, -2), slice(2, -2))
    assert out[inner].std() < 0.6 * flat[inner].std()
    assert np.abs(out[inner] - 100).max() < 60  # no salt-and-pepper outlier survives

    step = np.where(np.arange(64)[None, :] < 32, 40.0, 200.0).repeat(64, axis=0).astype(np.float32)
    np.testing.assert_array_equal(denoise(step, 3), step)  # not moved, not smeared
    noisy = step + rng.normal(0.0, 5.0, step.shape).astype(np.float32)
    edge = np.argmax(denoise(noisy, 3) > 120, axis=1)
    assert (edge == 32).mean() > 0.95


# ------------------------------------------------------------------------------------------------
# Brain mask and skull stripping


@pytest.mark.parametrize("n", [128, 256])  # full-resolution and block (2 x 2) topology
def test_skull_removal_keeps_the_brain_and_the_hematoma_only(n):
    f = n / 256
    hu, brain, inside, blob = synthetic_head(
        n=n, axes=(95 * f, 78 * f), skull=9 * f, scalp=7 * f, blob=((n - 1) / 2 - 20 * f, (n - 1) / 2 + 15 * f, 12 * f)
    )
    got = brain_mask(hu)
    assert got.shape == hu.shape and got.dtype == bool
    assert not (hu[got] >= BONE_HU).any()  # no bone
    assert not (got & ~brain).any()  # nothing outside the skull: scalp, bone, air
    assert got[blob].all()  # the hematoma is kept
    assert got[brain].mean() > 0.995

    stripped = strip_skull(to_uint8(apply_window(hu, (0.0, 80.0))), got)
    assert stripped[~brain].max() == 0
    assert stripped[blob].mean() > 200 and stripped[blob].min() > 128  # 70 HU of 0..80 stays bright


def test_brain_mask_of_one_slice_is_2d():
    hu, brain, _, _ = synthetic_head(k=1)
    got = brain_mask(hu[0])
    assert got.shape == hu.shape[1:]
    np.testing.assert_array_equal(got, brain_mask(hu)[0])


def test_slices_without_skull_hold_no_brain():
    n = 128
    yy, xx = np.mgrid[:n, :n]
    scalp_only = np.where(np.hypot(yy - 64, xx - 64) < 40, SCALP_HU, AIR_HU)  # above the vertex
    cap = np.where(np.hypot(yy - 64, xx - 64) < 30, SKULL_HU, scalp_only)  # bone cap, no brain
    vol = np.stack([np.full((n, n), AIR_HU), scalp_only, cap]).astype(np.float32)
    assert not brain_mask(vol).any()


def test_open_skull_ring_falls_back_without_taking_the_scalp():
    # Slices 2-4 have the ring open over 30 pixels (as after a craniectomy): their brain touches
    # the scalp through the gap; slice 3 has no closed neighbour and borrows from slice 2 or 4.
    hu, brain, inside, _ = synthetic_head(k=7, gap=30, gap_slices=(2, 3, 4))
    got = brain_mask(hu)
    for i in (2, 3, 4):
        assert got[i][brain[i]].mean() > 0.99
        assert (got[i] & ~inside[i]).sum() < 0.01 * brain[i].sum()  # at most a sliver of scalp
        assert not (hu[i][got[i]] >= BONE_HU).any()
    # The same slice alone (no closed neighbour to borrow from) still finds the brain.
    alone = brain_mask(hu[3])
    assert alone[brain[3]].mean() > 0.99
    assert (alone & ~inside[3]).sum() < 0.01 * brain[3].sum()


def test_scalp_above_the_vertex_is_not_brain():
    # Closed slices, then a bone cap, then a scalp disc with a few partial-volume bone pixels
    # around it: the scalp lies within the brain's footprint but does not continue the brain.
    hu, brain, _, _ = synthetic_head(k=4, noise=0.0)
    n = hu.shape[1]
    yy, xx = np.mgrid[:n, :n]
    rho = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2)
    cap = np.where(rho < 40, SKULL_HU, np.where(rho < 48, SCALP_HU, AIR_HU))
    disc = np.where(rho < 45, SCALP_HU, AIR_HU)
    angles = np.deg2rad(np.arange(0, 360, 30))
    disc[np.rint(127.5 + 38 * np.sin(angles)).astype(int), np.rint(127.5 + 38 * np.cos(angles)).astype(int)] = 400.0
    vol = np.concatenate([hu, cap[None], disc[None]]).astype(np.float32)
    got = brain_mask(vol)
    assert not got[4:].any()
    assert got[:4][brain].mean() > 0.995


def test_strip_skull_zeroes_outside_and_checks_shapes():
    img = np.full((2, 4, 4), 9, np.uint8)
    brain = np.zeros((2, 4, 4), bool)
    brain[:, 1:3, 1:3] = True
    out = strip_skull(img, brain)
    assert out.dtype == np.uint8 and out.sum() == 9 * 8
    with pytest.raises(ValueError):
        strip_skull(img, brain[0])


# ------------------------------------------------------------------------------------------------
# Centring


def test_centring_moves_brain_to_the_centre_and_the_mask_with_it():
    n = 256
    hu, brain, _, blob = synthetic_head(n=n, centre=(95.0, 160.0), axes=(70.0, 60.0), blob=(80.0, 170.0, 10.0))
    got = brain_mask(hu)
    img = to_uint8(apply_window(hu, (0.0, 80.0)))
    mask = blob.astype(np.uint8)
    out, out_mask, shift = centre_brain(img, got, mask)
    assert all(isinstance(v, int) for v in shift)
    assert shift == brain_centre_shift(got)
    assert out.shape == img.shape and out_mask.shape == mask.shape and out_mask.dtype == np.uint8
    moved_brain = translate(got, shift)
    assert moved_brain.sum() == got.sum()  # nothing pushed off the image
    np.testing.assert_allclose(centroid(moved_brain), [(n - 1) / 2, (n - 1) / 2], atol=1.0)
    np.testing.assert_allclose(centroid(out_mask) - centroid(mask), shift, atol=1e-9)
    np.testing.assert_array_equal(out_mask, translate(mask, shift))
    assert set(np.unique(out_mask)) <= {0, 1}
    # Every slice moved by the same shift (one per study).
    for i in range(hu.shape[0]):
        np.testing.assert_array_equal(out[i], translate(img[i], shift))


def test_translate_fills_with_zero():
    a = np.arange(1, 13, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(translate(a, (1, -2)), [[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0]])
    assert not translate(a, (5, 0)).any()
    assert brain_centre_shift(np.zeros((2, 5, 5), bool)) == (0, 0)


# ------------------------------------------------------------------------------------------------
# Resize


def test_resize_keeps_masks_binary_and_images_in_range():
    rng = np.random.default_rng(4)
    mask = (rng.random((2, 100, 70)) < 0.3).astype(np.uint8)
    out = resize_slices(mask, 64, order=0)
    assert out.shape == (2, 64, 64) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}
    img = rng.integers(0, 256, (2, 100, 70)).astype(np.uint8)
    out = resize_slices(img, 48, order=1)
    assert out.shape == (2, 48, 48) and out.dtype == np.uint8


def test_resize_bilinear_halving_is_the_2x2_mean():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(resize_slices(img, 2, order=1), [[2.5, 4.5], [10.5, 12.5]])
    # The uint8 fast path rounds half to even, exactly like the float path followed by np.rint.
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (3, 64, 64)).astype(np.uint8)
    via_float = to_uint8(resize_slices(u8.astype(np.float32), 16, order=1))
    np.testing.assert_array_equal(resize_slices(u8, 16, order=1), via_float)


def test_resize_pads_to_a_square_so_a_circle_stays_a_circle():
    yy, xx = np.mgrid[:100, :200]
    disc = (np.hypot(yy - 49.5, xx - 99.5) < 30).astype(np.uint8)
    out = resize_slices(disc, 50, order=0)
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 1
    np.testing.assert_allclose(centroid(out), [24.5, 24.5], atol=0.6)


# ------------------------------------------------------------------------------------------------
# Whole pipeline


def _manual(hu, mask, cfg: PreprocessConfig):
    """The pipeline spelled out with the public functions, whole-image denoising included."""
    brain = brain_mask(hu)
    img = to_uint8(apply_window(hu, cfg.window))
    if cfg.denoise:
        img = denoise(img, cfg.denoise_size)
    if cfg.strip_skull:
        img = strip_skull(img, brain)
    shift = (0, 0)
    if cfg.centre:
        img, mask, shift = centre_brain(img, brain, mask)
    masks = None if mask is None else resize_slices(mask, cfg.size, order=0)
    return resize_slices(img, cfg.size, order=1), masks, shift


@pytest.fixture(scope="module")
def study():
    hu, _, _, blob = synthetic_head(
        k=5, n=256, centre=(110.0, 140.0), axes=(80.0, 66.0), blob=(100.0, 150.0, 9.0), noise=8.0, seed=7
    )
    return hu, blob.astype(np.uint8)


def test_preprocess_volume_shapes_and_types(study):
    hu, mask = study
    out = preprocess_volume(hu, mask, PreprocessConfig(size=128))
    assert isinstance(out, PreprocessedVolume)
    assert out.slices.shape == (5, 128, 128) and out.slices.dtype == np.uint8
    assert out.masks.shape == (5, 128, 128) and out.masks.dtype == np.uint8
    assert set(np.unique(out.masks)) == {0, 1}
    assert out.brain_fraction.shape == (5,) and out.brain_fraction.dtype == np.float32
    assert ((out.brain_fraction > 0.1) & (out.brain_fraction < 1)).all()
    assert isinstance(out.shift, tuple) and len(out.shift) == 2 and out.shift != (0, 0)
    assert preprocess_volume(hu, None, PreprocessConfig(size=128)).masks is None


@pytest.mark.parametrize("off", [None, "denoise", "strip_skull", "centre"])
def test_each_step_switched_off_is_skipped(study, off):
    hu, mask = study
    cfg = PreprocessConfig(size=128)
    if off is not None:
        cfg = replace(cfg, **{off: False})
    out = preprocess_volume(hu, mask, cfg)
    slices, masks, shift = _manual(hu, mask, cfg)
    np.testing.assert_array_equal(out.slices, slices)
    np.testing.assert_array_equal(out.masks, masks)
    assert out.shift == shift
    if off is not None:  # and it makes a difference
        assert not np.array_equal(out.slices, preprocess_volume(hu, mask, PreprocessConfig(size=128)).slices)


def test_all_steps_off_is_window_and_resize_only(study):
    hu, mask = study
    cfg = PreprocessConfig(size=128, denoise=False, strip_skull=False, centre=False)
    out = preprocess_volume(hu, mask, cfg)
    np.testing.assert_array_equal(out.slices, resize_slices(to_uint8(apply_window(hu, cfg.window)), 128, 1))
    np.testing.assert_array_equal(out.masks, resize_slices(mask, 128, 0))
    assert out.shift == (0, 0)


def test_the_hematoma_survives_the_pipeline_on_its_mask(study):
    hu, mask = study
    out = preprocess_volume(hu, mask, PreprocessConfig(size=128))
    on = out.slices[out.masks == 1]
    assert on.size and on.mean() > 200  # 70 HU in a 0..80 window
    assert out.slices[0, 0, 0] == 0


def test_mask_maps_back_onto_the_input_grid(study):
    hu, mask = study
    out = preprocess_volume(hu, mask, PreprocessConfig(size=256))  # no resize: exact round trip
    np.testing.assert_array_equal(to_input_grid(out.masks, hu.shape[1:], out.shift), mask)
    half = preprocess_volume(hu, mask, PreprocessConfig(size=128))
    back = to_input_grid(half.masks, hu.shape[1:], half.shift)
    assert back.shape == mask.shape
    assert (back != mask).sum() < 0.25 * mask.sum()


def test_preprocess_volume_rejects_bad_masks(study):
    hu, mask = study
    with pytest.raises(ValueError, match="0 and 1"):
        preprocess_volume(hu, mask * 2)
    with pytest.raises(ValueError, match="shape"):
        preprocess_volume(hu, mask[:, :-1])
    with pytest.raises(ValueError):
        preprocess_volume(hu[0])
    out = preprocess_volume(hu, mask.astype(bool), PreprocessConfig(size=64))
    assert out.masks.dtype == np.uint8


def test_skull_base_keeps_every_large_compartment_and_drops_small_enclosed_bits():
    # One slice: the cranial ring split by a bony ridge into two compartments (as the petrous
    # ridges split temporal lobes from the posterior fossa), plus a small soft region closed by a
    # bony arch outside the ring (as the temporalis inside the zygomatic arch).
    n = 256
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot((yy - 128) / 90.0, (xx - 128) / 75.0)
    hu = np.where(r < 1, BRAIN_HU, np.where(r < 1.1, SKULL_HU, np.where(r < 1.18, SCALP_HU, AIR_HU)))
    hu[(np.abs(yy - 150) < 4) & (r < 1.05)] = SKULL_HU  # ridge: the brain in two parts
    arch = np.hypot(yy - 128, xx - 218) < 14  # soft region enclosed by the ring and an arch
    hu[arch & (r >= 1.1)] = SCALP_HU
    hu[(np.abs(np.hypot(yy - 128, xx - 218) - 14) < 3) & (r >= 1.05)] = SKULL_HU
    hu = hu.astype(np.float32)
    got = brain_mask(hu)
    upper, lower = (r < 1) & (yy < 146), (r < 1) & (yy > 154)
    assert got[upper].mean() > 0.99 and got[lower].mean() > 0.99
    assert not (got & (r >= 1)).any()
    assert (brain_mask(hu, min_component_fraction=0.0) & (r >= 1)).any()  # the arch does enclose it
    assert not brain_mask(hu, min_component_fraction=1.0)[lower].any()  # largest only


def test_pipeline_output_is_centred(study):
    hu, mask = study
    out = preprocess_volume(hu, mask, PreprocessConfig(size=256))  # model grid = input grid
    np.testing.assert_allclose(centroid(out.slices > 0), [127.5, 127.5], atol=1.0)
