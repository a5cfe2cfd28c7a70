"""Preprocessing (paper §4.1): window maths, median denoising, skull stripping, centring, resizing,
and the whole pipeline on a synthetic head with each step switched off in turn (§5.1.1)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from client.preprocessing.brain_mask import brain_mask
from client.preprocessing.pipeline import (
    PreprocessedVolume,
    apply_window,
    brain_centre_shift,
    centre_brain,
    denoise,
    preprocess_volume,
    resize_slices,
    strip_skull,
    to_input_grid,
    to_uint8,
    translate,
)
from common.config import PreprocessConfig
from tests.helpers.heads import centroid, synthetic_head

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
# Skull stripping


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


def test_pipeline_output_is_centred(study):
    hu, mask = study
    out = preprocess_volume(hu, mask, PreprocessConfig(size=256))  # model grid = input grid
    np.testing.assert_allclose(centroid(out.slices > 0), [127.5, 127.5], atol=1.0)
