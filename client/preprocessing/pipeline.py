"""The paper's preprocessing (§4.1) as small pure array functions, from an HU volume to model input.

Order (``preprocess_volume``), each step switchable through ``PreprocessConfig`` for the §5.1.1
ablation:

    HU [k, r, c] --apply_window--> 0..255 --denoise--> --strip_skull--> --centre_brain-->
        --resize_slices--> uint8 [k, S, S]

The brain mask (``client.preprocessing.brain_mask``) is computed once from the Hounsfield values
(before windowing, where bone and soft tissue are still told apart by their HU) and drives skull
stripping, centring and ``brain_fraction``. A hematoma mask goes through exactly the same geometric steps (the centring
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

from client.preprocessing.brain_mask import brain_mask
from client.preprocessing.morphology import bbox
from common.config import PreprocessConfig


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
# Skull stripping


def strip_skull(img: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Zero everything outside the brain (paper §4.1, skull removal): bone would otherwise be the
    brightest thing in the window (255) and scalp and table draw attention away from the brain.

    ``img`` and the bool ``brain`` (from ``brain_mask``) have the same shape; returns a new array of
    ``img``'s dtype.
    """
    if img.shape != brain.shape:
        raise ValueError(f"image {img.shape} and brain mask {brain.shape} differ in shape")
    return np.where(brain, img, np.zeros((), dtype=img.dtype))


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
    box = bbox(brain, max(int(size), 1) // 2)
    if box is None:
        return out
    sub = img[box] if size <= 1 else denoise(img[box], size)
    out[box] = np.where(brain[box], sub, np.zeros((), dtype=img.dtype))
    return out


__all__ = [
    "PreprocessedVolume",
    "apply_window",
    "to_uint8",
    "denoise",
    "strip_skull",
    "brain_centre_shift",
    "translate",
    "centre_brain",
    "model_pixel_mm",
    "resize_slices",
    "to_input_grid",
    "preprocess_volume",
]
