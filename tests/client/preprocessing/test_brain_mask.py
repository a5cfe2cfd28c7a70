"""``client.preprocessing.brain_mask``: the brain of phantom heads, open skull rings, the skull base."""

from __future__ import annotations

import numpy as np
import pytest

from client.preprocessing.brain_mask import BONE_HU, brain_mask
from client.preprocessing.pipeline import apply_window, strip_skull, to_uint8
from common.config import AIR_HU
from tests.helpers.heads import BRAIN_HU, SCALP_HU, SKULL_HU, synthetic_head


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
