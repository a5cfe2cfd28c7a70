"""``client.preprocessing.morphology``: the fast binary helpers agree with ``scipy.ndimage``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from client.preprocessing import morphology as morph


def _random_mask(shape=(3, 23, 17), p=0.3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


def test_dilate_and_erode_match_scipy_with_a_3x3_square():
    m = _random_mask()
    for i in range(m.shape[0]):
        np.testing.assert_array_equal(morph.dilate3x3(m)[i], ndi.binary_dilation(m[i], morph.SQUARE))
        np.testing.assert_array_equal(morph.erode3x3(m)[i], ndi.binary_erosion(m[i], morph.SQUARE, border_value=1))


def test_fill_holes_matches_scipy():
    for seed in range(5):
        m = _random_mask((31, 29), p=0.55, seed=seed)
        np.testing.assert_array_equal(morph.fill_holes(m), ndi.binary_fill_holes(m, morph.CROSS))
    assert not morph.fill_holes(np.zeros((4, 4), bool)).any()


def test_block_any_and_upsample_cover_the_mask():
    m = _random_mask(p=0.05)
    low = morph.block_any(m, 3)
    assert low.shape == (3, 8, 6)
    back = morph.upsample(low, 3, m.shape[-2:])
    assert back.shape == m.shape and not (m & ~back).any()
    np.testing.assert_array_equal(morph.block_any(m, 1), m)


def test_bbox_pads_and_clips():
    m = np.zeros((10, 12), bool)
    m[2:4, 5:9] = True
    assert morph.bbox(m, 0) == (slice(2, 4), slice(5, 9))
    assert morph.bbox(m, 3) == (slice(0, 7), slice(2, 12))
    assert morph.bbox_area(m) == 8
    assert morph.bbox(np.zeros((3, 3), bool), 1) is None and morph.bbox_area(np.zeros((3, 3), bool)) == 0
