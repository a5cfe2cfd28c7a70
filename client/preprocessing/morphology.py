"""Generic binary-image helpers for 2-D masks (``[r, c]``, some also ``[..., r, c]``).

Used by the brain mask (``client.preprocessing.brain_mask``) and the pipeline
(``client.preprocessing.pipeline``): block reduction and its inverse, 3 x 3 dilation and erosion,
bounding boxes, hole filling. Small vectorised numpy where ``scipy.ndimage`` would be slower for
the per-slice sizes of a CT study.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity: for the background of a bone ring
SQUARE = ndi.generate_binary_structure(2, 2)  # 8-connectivity: for the foreground


def block_any(mask: np.ndarray, f: int) -> np.ndarray:
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


def upsample(mask: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Repeat every pixel of ``[..., R, C]`` into an ``f x f`` block, cut to ``shape``."""
    if f == 1:
        return mask[..., : shape[0], : shape[1]]
    rr, cc = mask.shape[-2:]
    big = np.empty(mask.shape[:-2] + (rr * f, cc * f), dtype=mask.dtype)
    for dy in range(f):
        for dx in range(f):
            big[..., dy::f, dx::f] = mask
    return big[..., : shape[0], : shape[1]]


def dilate3x3(m: np.ndarray) -> np.ndarray:
    """Binary dilation of ``[..., r, c]`` by a 3 x 3 square (8-connectivity), the border not grown from
    outside: two shifted ORs instead of ``ndi.binary_dilation``, cheap enough to run per slice."""
    out = m.copy()
    out[..., 1:, :] |= m[..., :-1, :]
    out[..., :-1, :] |= m[..., 1:, :]
    rows = out.copy()
    out[..., :, 1:] |= rows[..., :, :-1]
    out[..., :, :-1] |= rows[..., :, 1:]
    return out


def erode3x3(m: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3 x 3 square, the dual of ``dilate3x3`` (outside the array counts as True)."""
    return ~dilate3x3(~m)


def bbox(m: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """Bounding box of a 2-D mask, ``pad`` pixels wider on every side (cut at 0, slices clip at the
    end), or None for an empty mask: lets the costly steps run on the part of a slice that matters."""
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def bbox_area(m: np.ndarray) -> int:
    """Pixels in the bounding box of a 2-D mask (0 when empty): a cheap upper bound of its convex hull."""
    box = bbox(m, 0)
    return 0 if box is None else (box[0].stop - box[0].start) * (box[1].stop - box[1].start)


def off_border(lab: np.ndarray, n: int) -> np.ndarray:
    """Per label of ``lab``: True when the component does not touch the array's border."""
    inner = np.ones(n + 1, dtype=bool)
    inner[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = False
    return inner


def fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill the holes of a 2-D mask: background components (4-connected) off the border."""
    box = bbox(m, 1)  # outside the mask's box (plus a margin) nothing is a hole
    out = m.copy()
    if box is None:
        return out
    lab, n = ndi.label(~m[box], CROSS)
    hole = off_border(lab, n)
    hole[0] = False  # label 0 is the mask itself
    out[box] |= hole[lab]
    return out


__all__ = [
    "CROSS",
    "SQUARE",
    "block_any",
    "upsample",
    "dilate3x3",
    "erode3x3",
    "bbox",
    "bbox_area",
    "off_border",
    "fill_holes",
]
