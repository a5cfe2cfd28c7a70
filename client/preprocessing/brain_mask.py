"""The brain (intracranial soft tissue) of an HU volume, for skull stripping (paper §4.1).

Computed on Hounsfield units, before windowing, where bone and soft tissue are still told apart by
their HU; ``client.preprocessing.pipeline`` uses it for skull stripping, centring and
``brain_fraction``. The topology runs on each slice in 2-D (slice thickness differs between sites);
only the fallback for slices whose skull ring is open borrows the brain's footprint from a
neighbouring slice.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from client.preprocessing.morphology import (
    CROSS,
    SQUARE,
    bbox,
    bbox_area,
    block_any,
    dilate3x3,
    erode3x3,
    fill_holes,
    off_border,
    upsample,
)

#: HU at or above which a voxel counts as bone. Cortical bone is 700-2000 HU and thin bone (temporal
#: squama, orbital roofs) still reads 200-400 HU at 5 mm partial volume, while an acute hematoma is
#: 40-90 HU (about 100 HU at most with a very high hematocrit). 150 HU leaves 50 HU (five noise
#: standard deviations or more) above the densest clot and still catches thin bone.
BONE_HU: float = 150.0
#: Soft-tissue range [lo, hi) of the intracranial content kept as brain: from CSF (0-15 HU, less
#: noise) up to the densest clot, below bone. Fat (-100 HU) and air (-1000 HU) fall below it.
SOFT_TISSUE_HU: tuple[float, float] = (-50.0, BONE_HU)
#: A second enclosed region of a slice is kept as brain when it holds at least this share of the
#: soft tissue of the slice's largest one: at the skull base the petrous ridges and the sphenoid split the temporal
#: lobes and the posterior fossa into separate components; smaller enclosed bits (e.g. the
#: temporalis muscle inside the zygomatic arch) are dropped.
MIN_COMPONENT_FRACTION: float = 0.1
#: A slice's skull ring counts as open when the enclosed brain covers less than this share of the
#: convex hull of the slice's bone (craniectomy, a bony gap wider than the closing, skull base).
OPEN_RING_FRACTION: float = 0.1


def brain_mask(
    hu: np.ndarray,
    *,
    bone_hu: float = BONE_HU,
    soft_range: tuple[float, float] = SOFT_TISSUE_HU,
    min_component_fraction: float = MIN_COMPONENT_FRACTION,
    open_ring_fraction: float = OPEN_RING_FRACTION,
    block: int | None = None,
) -> np.ndarray:
    """Brain (intracranial soft tissue) of an HU slice ``[r, c]`` or volume ``[k, r, c]``, as bool.

    Support for skull removal (paper §4.1), computed on Hounsfield units, before windowing:

    1. bone = HU >= ``bone_hu`` (``BONE_HU``, 150 HU: above any hematoma, below any bone).
    2. The intracranial cavity of each slice = the non-bone regions that the skull ring encloses,
       i.e. that do not reach the image border (4-connected, so a diagonal ring still closes),
       restricted to ``soft_range`` (air cells and fat drop out).
    3. Per slice, the enclosed region holding the most soft tissue is brain, and so is any other
       with at least ``min_component_fraction`` of that (skull base: the temporal lobes and the
       posterior fossa are separate); holes inside are filled (ventricles with noisy CSF,
       calcified pineal or choroid plexus, which are intracranial content, not skull).
    4. Open ring: where the brain is missing (less than ``open_ring_fraction`` of the convex hull
       of the slice's bone is enclosed: craniectomy, a bony gap, the skull base), the fallback takes
       soft tissue inside that hull, eroded to cut thin bridges to the scalp, keeps the components
       lying mostly (>= 50 %) within the brain of a neighbouring slice (the 3-D brain: open
       slices are visited outwards from the closed ones, so a run of open slices chains on, while
       a scalp disc above a brainless bone cap does not), and grows them back. Without any closed
       slice in the volume it keeps the largest. Slices without bone hold no brain.

    The topology runs on ``block x block`` blocks (bone if any pixel of the block is bone, which
    also bridges one-pixel gaps in thin bone); the result is refined at full resolution: blocks at
    the brain's border keep only their soft-tissue pixels. ``block=None`` picks 2 for slices of at
    least 256 pixels and 1 below. Everything outside the skull (scalp, air, table, face) and the
    bone itself is False.
    """
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3):
        raise ValueError(f"brain_mask needs [r, c] or [k, r, c], got shape {hu.shape}")
    vol = hu[None] if hu.ndim == 2 else hu
    k, r, c = vol.shape
    if block is None:
        block = 2 if min(r, c) >= 256 else 1
    lo_hu, hi_hu = float(soft_range[0]), min(float(soft_range[1]), float(bone_hu))

    # Slice by slice, so that the full-resolution temporaries stay in cache.
    rr, cc = -(-r // block), -(-c // block)
    bone_lo = np.zeros((k, rr, cc), dtype=bool)
    soft_lo = np.zeros((k, rr, cc), dtype=bool)
    for i in range(k):
        bone = vol[i] >= bone_hu
        soft = (vol[i] >= lo_hu) & (vol[i] < hi_hu)
        bone_lo[i] = block_any(bone, block)
        soft_lo[i] = block_any(soft, block) & ~bone_lo[i]

    brain_lo = np.zeros_like(bone_lo)
    closed = np.zeros(k, dtype=bool)
    has_bone = bone_lo.any(axis=(1, 2))
    for i in np.flatnonzero(has_bone):
        brain_lo[i] = _enclosed_brain(bone_lo[i], soft_lo[i], min_component_fraction)
        area = int(brain_lo[i].sum())
        # The hull is only needed when the enclosed area is small against the bone's bounding box.
        if area >= 0.25 * bbox_area(bone_lo[i]):
            closed[i] = True
        else:
            closed[i] = area >= open_ring_fraction * int(_convex_hull(bone_lo[i]).sum()) and area > 0
    open_slices = np.flatnonzero(has_bone & ~closed)
    if open_slices.size:
        radius = max(1, round(max(rr, cc) / 128))
        closed_idx = np.flatnonzero(closed)
        if closed_idx.size:
            # Outwards from the closed slices, each open slice borrowing from a decided neighbour:
            # the brain continues from slice to slice, a scalp disc above the vertex does not.
            open_slices = sorted(open_slices, key=lambda i: int(np.abs(closed_idx - i).min()))
        decided = closed.copy()
        for i in open_slices:
            footprint = None
            if closed_idx.size:
                nbs = [j for j in (i - 1, i + 1) if 0 <= j < k and decided[j] and brain_lo[j].any()]
                if not nbs:
                    continue
                footprint = ndi.binary_dilation(
                    np.logical_or.reduce([brain_lo[j] for j in nbs]), SQUARE, iterations=radius
                )
            extra = _open_ring_brain(bone_lo[i], soft_lo[i], radius, footprint)
            if extra is not None:
                brain_lo[i] = fill_holes(brain_lo[i] | extra)
                decided[i] = True

    # Back to full resolution: interior blocks as they are (filled holes included); blocks at the
    # border and the one-block rim around them (which holds the bone) keep only soft tissue.
    out = np.zeros((k, r, c), dtype=bool)
    for i in range(k):
        border_lo = dilate3x3(brain_lo[i])
        box = bbox(border_lo, 0)
        if box is None:
            continue
        interior_lo = erode3x3(brain_lo[i])[box]
        full = (
            slice(box[0].start * block, min(box[0].stop * block, r)),
            slice(box[1].start * block, min(box[1].stop * block, c)),
        )
        shape = (full[0].stop - full[0].start, full[1].stop - full[1].start)
        sub = vol[i][full]
        soft = (sub >= lo_hu) & (sub < hi_hu)
        out[i][full] = upsample(interior_lo, block, shape) | (upsample(border_lo[box], block, shape) & soft)
    return out[0] if hu.ndim == 2 else out


def _enclosed_brain(bone: np.ndarray, soft: np.ndarray, min_fraction: float) -> np.ndarray:
    """Soft tissue of the non-bone components that the bone encloses (2-D), holes filled."""
    out = np.zeros_like(soft)
    box = bbox(bone, 1)  # beyond the bone's box (plus a margin) everything reaches the border
    if box is None:
        return out
    lab, n = ndi.label(~bone[box], CROSS)
    sub_soft = soft[box]
    sizes = np.bincount(lab[sub_soft], minlength=n + 1)
    sizes[~off_border(lab, n)] = 0
    sizes[0] = 0
    biggest = sizes.max()
    if biggest == 0:
        return out
    keep = sizes >= max(min_fraction * biggest, 1)
    out[box] = keep[lab] & sub_soft
    return fill_holes(out)


def _convex_hull(m: np.ndarray) -> np.ndarray:
    """Filled convex hull of the True pixels (centres) of a 2-D mask, row by row."""
    out = np.zeros_like(m)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return out
    sub = m[rows]
    left = sub.argmax(axis=1)
    right = m.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    ys = np.arange(rows[0], rows[-1] + 1)
    # The hull's left edge is the convex minorant of the rows' leftmost pixels, its right edge the
    # concave majorant of their rightmost pixels.
    lx = np.interp(ys, *_lower_chain(rows, left))
    rx = -np.interp(ys, *_lower_chain(rows, -right))
    cols = np.arange(m.shape[1])
    out[ys] = (cols >= np.ceil(lx - 1e-6)[:, None]) & (cols <= np.floor(rx + 1e-6)[:, None])
    return out


def _lower_chain(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the lower convex hull of points (y, x) sorted by strictly increasing y."""
    hy: list[float] = []
    hx: list[float] = []
    for yi, xi in zip(y.tolist(), x.tolist()):
        while len(hy) >= 2 and (hy[-1] - hy[-2]) * (xi - hx[-2]) - (hx[-1] - hx[-2]) * (yi - hy[-2]) <= 0:
            hy.pop()
            hx.pop()
        hy.append(yi)
        hx.append(xi)
    return np.asarray(hy, dtype=float), np.asarray(hx, dtype=float)


def _open_ring_brain(
    bone: np.ndarray, soft: np.ndarray, radius: int, footprint: np.ndarray | None
) -> np.ndarray | None:
    """Brain of a slice whose skull ring is open: soft tissue inside the bone's convex hull, eroded by
    ``radius`` to cut thin bridges to the scalp, keeping the components lying mostly within
    ``footprint`` (the largest one without it), grown back; None when nothing qualifies."""
    cand = soft & _convex_hull(bone)
    core = ndi.binary_erosion(cand, SQUARE, iterations=radius)
    lab, n = ndi.label(core, SQUARE)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    if footprint is None:
        keep = np.zeros(n + 1, dtype=bool)
        keep[int(sizes.argmax())] = True
    else:
        inside = np.bincount(lab[footprint], minlength=n + 1)
        keep = 2 * inside >= sizes
        keep[0] = False
        if not keep.any():
            return None
    grown = ndi.binary_dilation(keep[lab], SQUARE, iterations=radius, mask=cand)
    return grown


__all__ = [
    "BONE_HU",
    "SOFT_TISSUE_HU",
    "MIN_COMPONENT_FRACTION",
    "OPEN_RING_FRACTION",
    "brain_mask",
]
