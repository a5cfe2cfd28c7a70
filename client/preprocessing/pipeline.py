"""The paper's preprocessing (§4.1) as small pure array functions, from an HU volume to model input.

Order (``preprocess_volume``), each step switchable through ``PreprocessConfig`` for the §5.1.1
ablation:

    HU [k, r, c] --apply_window--> 0..255 --denoise--> --strip_skull--> --centre_brain-->
        --resize_slices--> uint8 [k, S, S]

The brain mask is computed once from the Hounsfield values (before windowing, where bone and soft
tissue are still told apart by their HU) and drives skull stripping, centring and
``brain_fraction``. A hematoma mask goes through exactly the same geometric steps (the centring
shift, the padding to a square and the resize, nearest neighbour) and stays 0/1.

Slices are processed in 2-D (denoising, brain topology): slice thickness differs between sites
(0.6 to 5 mm), so nothing mixes neighbouring slices except the centring, which uses one in-plane
shift per study so that its slices stay aligned, and the fallback of ``brain_mask`` for slices
whose skull ring is open, which borrows the brain's footprint from a neighbouring slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from common.config import PreprocessConfig

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

_CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity: for the background of a bone ring
_SQUARE = ndi.generate_binary_structure(2, 2)  # 8-connectivity: for the foreground


@dataclass(frozen=True, eq=False)
class PreprocessedVolume:
    """Model input of one study.

    Attributes
    ----------
    slices: uint8 ``[k, S, S]`` windowed, denoised, skull-stripped, centred, resized slices.
    masks: uint8 ``[k, S, S]`` 0/1 hematoma masks on the same grid, or None without a mask.
    brain_fraction: float32 ``[k]`` share of each input slice's pixels that are brain (0 for slices
        without brain, e.g. above the vertex or below the foramen magnum): lets a dataset skip them.
    shift: ``(dy, dx)`` in input pixels, the integer translation applied by the centring
        (``out[y + dy, x + dx] = in[y, x]``); ``(0, 0)`` when centring is off.
    """

    slices: np.ndarray
    masks: np.ndarray | None
    brain_fraction: np.ndarray
    shift: tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Window


def apply_window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map the HU window [a, b] linearly onto [0, 255], clipped outside (paper §4.1, eq. 1).

    ``I = 0`` below a, ``255 * (HU - a) / (b - a)`` inside, ``255`` above b: the DICOM VOI LUT idea
    (WindowCenter = (a + b) / 2, WindowWidth = b - a) without its -0.5 / -1 offsets, so that a maps
    to 0, b to 255 and (a + b) / 2 to 127.5 exactly. Returns float32 of the same shape.
    """
    a, b = float(window[0]), float(window[1])
    if not b > a:
        raise ValueError(f"window must satisfy a < b, got {window}")
    out = np.subtract(hu, np.float32(a), dtype=np.float32)
    np.multiply(out, np.float32(255.0 / (b - a)), out=out)
    return np.clip(out, 0.0, 255.0, out=out)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round (half to even) and clip a 0..255 image to uint8: the model's 8-bit input, like the
    paper's images."""
    if img.dtype == np.uint8:
        return img
    out = np.rint(img).astype(np.float32, copy=False)
    return np.clip(out, 0.0, 255.0, out=out).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Noise


def denoise(img: np.ndarray, size: int = 3) -> np.ndarray:
    """Median filter of ``size x size`` pixels on every slice (paper §4.1, noise removal).

    Why a median: CT noise at brain windows is quantum (photon-starvation) noise with streak and
    salt-and-pepper outliers; a median removes isolated outliers completely and shrinks Gaussian-like
    noise, while keeping a step edge exactly where it was. Hematoma margins (``irregular_margin``)
    and the sharp boundary of the blend sign (two densities >= 18 HU apart) are step edges that a
    Gaussian or mean filter of the same support would smear over 2-3 pixels. 3 x 3 is the smallest
    median that removes single-pixel outliers; larger medians start to erase thin structures and
    small hypodensities (black-hole sign).

    Per slice (2-D), never across slices: slice thickness differs between sites, so a 3-D
    neighbourhood would mean something different at each site. ``img`` is ``[..., H, W]``; borders
    replicate the edge pixel. ``size=3`` uses an exact min/max network (Paeth's column-sort median,
    18 vectorised min/max operations, about 50x faster than ``scipy.ndimage.median_filter``); other
    sizes use ``scipy.ndimage.median_filter``. Returns the same dtype; ``size <= 1`` returns a copy.
    """
    img = np.asarray(img)
    if img.ndim < 2:
        raise ValueError(f"denoise needs [..., H, W], got shape {img.shape}")
    size = int(size)
    if size <= 1:
        return img.copy()
    if size == 3:
        return _median3x3(img)
    footprint = (1,) * (img.ndim - 2) + (size, size)
    return ndi.median_filter(img, size=footprint, mode="nearest")


def _median3x3(img: np.ndarray) -> np.ndarray:
    # Sort every vertical triple once; the 3x3 median is then the median of (largest column minimum,
    # median of column medians, smallest column maximum) over three neighbouring columns. One slice
    # at a time into reused buffers, which stay in cache (fresh full-volume temporaries cost 3x).
    h, w = img.shape[-2:]
    flat = img.reshape(-1, h, w)
    out = np.empty_like(flat)
    p = np.empty((h + 2, w + 2), dtype=img.dtype)
    lo, hi, mid, tmp = (np.empty((h, w + 2), dtype=img.dtype) for _ in range(4))
    ma, mb, mc, md = (np.empty((h, w), dtype=img.dtype) for _ in range(4))
    for i in range(flat.shape[0]):
        p[1:-1, 1:-1] = flat[i]
        p[0, 1:-1], p[-1, 1:-1] = flat[i, 0], flat[i, -1]
        p[:, 0], p[:, -1] = p[:, 1], p[:, -2]
        a, b, c = p[:-2], p[1:-1], p[2:]
        np.minimum(a, b, out=lo)
        np.maximum(a, b, out=hi)
        np.minimum(hi, c, out=mid)
        np.maximum(hi, c, out=hi)  # column maximum
        np.maximum(lo, mid, out=tmp)
        np.minimum(lo, mid, out=lo)  # column minimum
        mid, tmp = tmp, mid  # column median
        np.maximum(lo[:, :-2], lo[:, 1:-1], out=ma)
        np.maximum(ma, lo[:, 2:], out=ma)  # largest column minimum
        np.minimum(hi[:, :-2], hi[:, 1:-1], out=mb)
        np.minimum(mb, hi[:, 2:], out=mb)  # smallest column maximum
        np.minimum(mid[:, :-2], mid[:, 1:-1], out=mc)
        np.maximum(mid[:, :-2], mid[:, 1:-1], out=md)
        np.minimum(md, mid[:, 2:], out=md)
        np.maximum(mc, md, out=mc)  # median of column medians
        np.minimum(ma, mc, out=md)
        np.maximum(ma, mc, out=ma)
        np.minimum(ma, mb, out=ma)
        np.maximum(md, ma, out=out[i])
    return out.reshape(img.shape)


# --------------------------------------------------------------------------------------------------
# Brain mask and skull stripping


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
        bone_lo[i] = _block_any(bone, block)
        soft_lo[i] = _block_any(soft, block) & ~bone_lo[i]

    brain_lo = np.zeros_like(bone_lo)
    closed = np.zeros(k, dtype=bool)
    has_bone = bone_lo.any(axis=(1, 2))
    for i in np.flatnonzero(has_bone):
        brain_lo[i] = _enclosed_brain(bone_lo[i], soft_lo[i], min_component_fraction)
        area = int(brain_lo[i].sum())
        # The hull is only needed when the enclosed area is small against the bone's bounding box.
        if area >= 0.25 * _bbox_area(bone_lo[i]):
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
                    np.logical_or.reduce([brain_lo[j] for j in nbs]), _SQUARE, iterations=radius
                )
            extra = _open_ring_brain(bone_lo[i], soft_lo[i], radius, footprint)
            if extra is not None:
                brain_lo[i] = _fill_holes(brain_lo[i] | extra)
                decided[i] = True

    # Back to full resolution: interior blocks as they are (filled holes included); blocks at the
    # border and the one-block rim around them (which holds the bone) keep only soft tissue.
    out = np.zeros((k, r, c), dtype=bool)
    for i in range(k):
        border_lo = _dilate3x3(brain_lo[i])
        box = _bbox(border_lo, 0)
        if box is None:
            continue
        interior_lo = _erode3x3(brain_lo[i])[box]
        full = (
            slice(box[0].start * block, min(box[0].stop * block, r)),
            slice(box[1].start * block, min(box[1].stop * block, c)),
        )
        shape = (full[0].stop - full[0].start, full[1].stop - full[1].start)
        sub = vol[i][full]
        soft = (sub >= lo_hu) & (sub < hi_hu)
        out[i][full] = _upsample(interior_lo, block, shape) | (_upsample(border_lo[box], block, shape) & soft)
    return out[0] if hu.ndim == 2 else out


def strip_skull(img: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Zero everything outside the brain (paper §4.1, skull removal): bone would otherwise be the
    brightest thing in the window (255) and scalp and table draw attention away from the brain.

    ``img`` and the bool ``brain`` (from ``brain_mask``) have the same shape; returns a new array of
    ``img``'s dtype.
    """
    if img.shape != brain.shape:
        raise ValueError(f"image {img.shape} and brain mask {brain.shape} differ in shape")
    return np.where(brain, img, np.zeros((), dtype=img.dtype))


def _block_any(mask: np.ndarray, f: int) -> np.ndarray:
    """``[..., r, c]`` -> ``[..., ceil(r / f), ceil(c / f)]``: True where any pixel of the block is."""
    if f == 1:
        return mask.copy()
    r, c = mask.shape[-2:]
    pr, pc = -r % f, -c % f
    if pr or pc:
        mask = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, pr), (0, pc)])
    out = mask[..., ::f, ::f].copy()
    for dy in range(f):
        for dx in range(f):
            if dy or dx:
                out |= mask[..., dy::f, dx::f]
    return out


def _upsample(mask: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Repeat every pixel of ``[..., R, C]`` into an ``f x f`` block, cut to ``shape``."""
    if f == 1:
        return mask[..., : shape[0], : shape[1]]
    rr, cc = mask.shape[-2:]
    big = np.empty(mask.shape[:-2] + (rr * f, cc * f), dtype=mask.dtype)
    for dy in range(f):
        for dx in range(f):
            big[..., dy::f, dx::f] = mask
    return big[..., : shape[0], : shape[1]]


def _dilate3x3(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[..., 1:, :] |= m[..., :-1, :]
    out[..., :-1, :] |= m[..., 1:, :]
    rows = out.copy()
    out[..., :, 1:] |= rows[..., :, :-1]
    out[..., :, :-1] |= rows[..., :, 1:]
    return out


def _erode3x3(m: np.ndarray) -> np.ndarray:
    return ~_dilate3x3(~m)


def _bbox(m: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def _bbox_area(m: np.ndarray) -> int:
    box = _bbox(m, 0)
    return 0 if box is None else (box[0].stop - box[0].start) * (box[1].stop - box[1].start)


def _off_border(lab: np.ndarray, n: int) -> np.ndarray:
    """Per label of ``lab``: True when the component does not touch the array's border."""
    inner = np.ones(n + 1, dtype=bool)
    inner[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = False
    return inner


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill the holes of a 2-D mask: background components (4-connected) off the border."""
    box = _bbox(m, 1)  # outside the mask's box (plus a margin) nothing is a hole
    out = m.copy()
    if box is None:
        return out
    lab, n = ndi.label(~m[box], _CROSS)
    hole = _off_border(lab, n)
    hole[0] = False  # label 0 is the mask itself
    out[box] |= hole[lab]
    return out


def _enclosed_brain(bone: np.ndarray, soft: np.ndarray, min_fraction: float) -> np.ndarray:
    """Soft tissue of the non-bone components that the bone encloses (2-D), holes filled."""
    out = np.zeros_like(soft)
    box = _bbox(bone, 1)  # beyond the bone's box (plus a margin) everything reaches the border
    if box is None:
        return out
    lab, n = ndi.label(~bone[box], _CROSS)
    sub_soft = soft[box]
    sizes = np.bincount(lab[sub_soft], minlength=n + 1)
    sizes[~_off_border(lab, n)] = 0
    sizes[0] = 0
    biggest = sizes.max()
    if biggest == 0:
        return out
    keep = sizes >= max(min_fraction * biggest, 1)
    out[box] = keep[lab] & sub_soft
    return _fill_holes(out)


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
    cand = soft & _convex_hull(bone)
    core = ndi.binary_erosion(cand, _SQUARE, iterations=radius)
    lab, n = ndi.label(core, _SQUARE)
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
    grown = ndi.binary_dilation(keep[lab], _SQUARE, iterations=radius, mask=cand)
    return grown


# --------------------------------------------------------------------------------------------------
# Geometry: centring, resizing


def brain_centre_shift(brain: np.ndarray) -> tuple[int, int]:
    """Integer in-plane shift ``(dy, dx)`` that brings the brain's centroid to the image centre.

    The centroid is taken over every brain voxel of the study (all slices together), so one shift
    serves the whole volume; the centre of an ``H x W`` slice is ``((H - 1) / 2, (W - 1) / 2)``.
    Returns ``(0, 0)`` when there is no brain.
    """
    brain = np.asarray(brain, dtype=bool)
    h, w = brain.shape[-2:]
    counts = brain.reshape(-1, h, w).view(np.uint8).sum(axis=0, dtype=np.int64)  # [H, W] over slices
    per_row, per_col = counts.sum(axis=1), counts.sum(axis=0)
    total = int(per_row.sum())
    if total == 0:
        return 0, 0
    cy = float(per_row @ np.arange(h)) / total
    cx = float(per_col @ np.arange(w)) / total
    return int(np.rint((h - 1) / 2 - cy)), int(np.rint((w - 1) / 2 - cx))


def translate(img: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """Translate ``[..., H, W]`` by whole pixels, ``out[y + dy, x + dx] = img[y, x]``, filling 0."""
    dy, dx = int(shift[0]), int(shift[1])
    h, w = img.shape[-2:]
    out = np.zeros_like(img)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = img[..., src_y, src_x]
    return out


def centre_brain(
    img: np.ndarray, brain: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """Translate the brain to the image centre (paper §4.1, "translation to the centre").

    One integer shift per study (``brain_centre_shift`` of the 3-D brain mask), applied to every
    slice of ``img`` and identically to ``mask``, so the slices of a study stay aligned and the
    mask stays on its image. Pixels moved in are 0 (air after windowing); the brain's centroid ends
    within half a pixel of ``((H - 1) / 2, (W - 1) / 2)``. Returns ``(img, mask, (dy, dx))``.
    """
    if brain.shape[-2:] != img.shape[-2:]:
        raise ValueError(f"image {img.shape} and brain mask {brain.shape} differ in shape")
    if mask is not None and mask.shape != img.shape:
        raise ValueError(f"image {img.shape} and mask {mask.shape} differ in shape")
    shift = brain_centre_shift(brain)
    return translate(img, shift), (None if mask is None else translate(mask, shift)), shift


def model_pixel_mm(pixel_spacing: tuple[float, float], shape_rc: tuple[int, int], size: int) -> tuple[float, float]:
    """Size in mm (between rows, between columns) of one pixel after ``resize_slices``:
    the square side (the longer of rows and columns) is spread over ``size`` pixels."""
    side = max(shape_rc)
    return (pixel_spacing[0] * side / size, pixel_spacing[1] * side / size)


def resize_slices(img: np.ndarray, size: int, order: int = 1) -> np.ndarray:
    """Pad ``[..., H, W]`` to a centred square with 0, then resample it to ``size x size``.

    Padding first keeps the aspect ratio (pixels stay square: a 512 x 400 slice does not get
    stretched); 0 is air after windowing and outside any mask. ``order=1`` is bilinear with
    pixel-centre alignment (``align_corners=False``, as in torch and OpenCV; a 2x reduction is
    exactly the mean of each 2 x 2 block, larger reductions are not anti-aliased), for images;
    ``order=0`` is nearest neighbour (the source pixel under each output pixel's centre), for
    masks, which stay 0/1. Returns the input dtype (integers rounded).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    img = np.asarray(img)
    h, w = img.shape[-2:]
    side = max(h, w)
    if h != w:
        pads = [(0, 0)] * (img.ndim - 2) + [
            ((side - h) // 2, side - h - (side - h) // 2),
            ((side - w) // 2, side - w - (side - w) // 2),
        ]
        img = np.pad(img, pads)
    if side == size:
        return img.copy() if img.dtype != bool else img
    if order == 0:
        idx = np.minimum(((np.arange(size) + 0.5) * (side / size)).astype(np.intp), side - 1)
        return img[..., idx[:, None], idx[None, :]]
    if img.dtype == np.uint8 and side % size == 0:
        return _shrink_uint8(img, side // size)
    i0, i1, wt = _linear_taps(side, size)
    # Gather the two source rows first, so that the float work runs on the smaller array.
    x = img[..., i0, :].astype(np.float32) * (1 - wt)[:, None]
    x += img[..., i1, :].astype(np.float32) * wt[:, None]
    x = x[..., i0] * (1 - wt) + x[..., i1] * wt
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(x, out=x), info.min, info.max, out=x).astype(img.dtype)
    return x.astype(img.dtype, copy=False)


def _shrink_uint8(img: np.ndarray, f: int) -> np.ndarray:
    """Bilinear reduction by a whole factor in integers, bit-identical to the float path.

    Pixel-centre sampling lands halfway between two pixels (weights 1/2) for an even factor, so an
    output pixel is the mean of a 2 x 2 block, rounded half to even like ``np.rint``; it lands on a
    source pixel (weight 0) for an odd factor.
    """
    if f % 2:
        o = (f - 1) // 2
        return img[..., o::f, o::f].copy()
    o = f // 2 - 1
    total = img[..., o::f, o::f].astype(np.uint16)
    total += img[..., o + 1 :: f, o::f]
    total += img[..., o::f, o + 1 :: f]
    total += img[..., o + 1 :: f, o + 1 :: f]
    q = total >> 2
    rem = total & 3
    q += (rem == 3) | ((rem == 2) & ((q & 1) == 1))
    return q.astype(np.uint8)


def _linear_taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, (src - i0).astype(np.float32)


def to_input_grid(img: np.ndarray, input_shape: tuple[int, int], shift: tuple[int, int], order: int = 0) -> np.ndarray:
    """Map model-grid slices ``[..., S, S]`` back onto the input grid ``[..., H, W]``.

    The inverse of ``resize_slices`` (to the padded square, then the padding cut off) and of the
    centring ``shift``: a predicted mask (``order=0``) or probability map (``order=1``) lands on
    the DICOM voxels it came from, up to the resolution lost by the resize.
    """
    h, w = int(input_shape[0]), int(input_shape[1])
    side = max(h, w)
    out = resize_slices(img, side, order=order)
    top, left = (side - h) // 2, (side - w) // 2
    out = out[..., top : top + h, left : left + w]
    return translate(out, (-int(shift[0]), -int(shift[1])))


# --------------------------------------------------------------------------------------------------
# The whole pipeline


def preprocess_volume(
    hu: np.ndarray, mask: np.ndarray | None = None, cfg: PreprocessConfig | None = None
) -> PreprocessedVolume:
    """Preprocess one study (paper §4.1): window, denoise, strip the skull, centre, resize.

    ``hu`` is float ``[k, r, c]`` in Hounsfield units (air = ``common.config.AIR_HU``); ``mask`` an
    optional 0/1 (or bool) hematoma mask of the same shape. The brain mask is computed once from
    ``hu``; the windowed image is rounded to 8 bits right after windowing (the median commutes with
    that rounding; the resize moves values by under one grey level). The mask gets the same
    centring shift and the same pad-and-resize (nearest), and stays 0/1. Steps switched off in
    ``cfg`` are skipped; the brain mask is still computed, for ``brain_fraction``.

    The result equals the composition ``apply_window -> to_uint8 -> denoise -> strip_skull ->
    centre_brain -> resize_slices`` on the whole volume; it runs slice by slice (cache-sized
    temporaries) and, when the skull is stripped, denoises only each slice's brain box.
    """
    cfg = cfg or PreprocessConfig()
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"preprocess_volume needs an HU volume [k, r, c], got shape {hu.shape}")
    if mask is not None:
        mask = _as_binary_mask(mask, hu.shape)
    k, r, c = hu.shape
    if k and np.isnan(hu.min()):
        raise ValueError("HU volume holds NaN; the reader must map missing pixels to air")

    brain = brain_mask(hu)
    shift = brain_centre_shift(brain) if cfg.centre else (0, 0)
    slices = np.empty((k, cfg.size, cfg.size), dtype=np.uint8)
    for i in range(k):
        img = to_uint8(apply_window(hu[i], cfg.window))
        if cfg.strip_skull:
            img = _denoise_and_strip(img, brain[i], cfg.denoise_size if cfg.denoise else 1)
        elif cfg.denoise:
            img = denoise(img, cfg.denoise_size)
        if cfg.centre:
            img = translate(img, shift)
        slices[i] = resize_slices(img, cfg.size, order=1)
    masks = None
    if mask is not None:
        masks = resize_slices(translate(mask, shift) if cfg.centre else mask, cfg.size, order=0)
    fraction = (np.count_nonzero(brain.reshape(k, -1), axis=1) / float(r * c)).astype(np.float32)
    return PreprocessedVolume(slices=slices, masks=masks, brain_fraction=fraction, shift=shift)


def _as_binary_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {shape}")
    if mask.dtype == np.uint8:
        bad = bool((mask > 1).any())
    else:
        bad = mask.dtype != bool and bool(((mask != 0) & (mask != 1)).any())
    if bad:
        raise ValueError("mask must hold only 0 and 1")
    return mask.astype(np.uint8)


def _denoise_and_strip(img: np.ndarray, brain: np.ndarray, size: int) -> np.ndarray:
    """``strip_skull(denoise(img, size), brain)`` of one slice, filtering only the brain's box
    plus half the filter: every brain pixel sees the same neighbourhood, the rest is zeroed."""
    out = np.zeros_like(img)
    box = _bbox(brain, max(int(size), 1) // 2)
    if box is None:
        return out
    sub = img[box] if size <= 1 else denoise(img[box], size)
    out[box] = np.where(brain[box], sub, np.zeros((), dtype=img.dtype))
    return out


__all__ = [
    "BONE_HU",
    "SOFT_TISSUE_HU",
    "PreprocessedVolume",
    "apply_window",
    "to_uint8",
    "denoise",
    "brain_mask",
    "strip_skull",
    "brain_centre_shift",
    "translate",
    "centre_brain",
    "resize_slices",
    "to_input_grid",
    "preprocess_volume",
]
