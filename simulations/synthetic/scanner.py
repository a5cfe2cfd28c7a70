"""What a site's scanner does to the true HU volume: the acquisition side of covariate shift.

Order follows the physics loosely: beam-hardening (cupping, posterior-fossa streaks) happens in
the projections, the reconstruction kernel then shapes both resolution and noise texture, the
calibration offset shifts everything, and pixels outside the reconstruction circle carry no data.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.config import AIR_HU
from simulations.synthetic.anatomy import HeadPose, HeadVolume, ScanGrid
from simulations.synthetic.profiles import SiteProfile

#: Lowest value a CT reconstruction reports (HU); noise in air is clipped here.
MIN_HU = -1024.0


def apply_kernel(img: np.ndarray, kernel: str) -> np.ndarray:
    """In-plane reconstruction kernel: Gaussian blur (smooth, standard) or unsharp mask (sharp)."""
    if kernel == "smooth":
        return ndimage.gaussian_filter(img, sigma=(0, 0.9, 0.9), truncate=3.0)
    if kernel == "standard":
        return ndimage.gaussian_filter(img, sigma=(0, 0.5, 0.5), truncate=3.0)
    if kernel == "sharp":
        base = ndimage.gaussian_filter(img, sigma=(0, 0.35, 0.35), truncate=3.0)
        blur = ndimage.gaussian_filter(base, sigma=(0, 1.0, 1.0), truncate=3.0)
        return base + 0.4 * (base - blur)
    raise KeyError(f"unknown kernel {kernel!r}; valid: smooth, standard, sharp")


def fov_outside(grid: ScanGrid, fov_mm: float) -> np.ndarray:
    """(R, C) mask of pixels outside the inscribed reconstruction circle."""
    cx, cy = grid.centre_xy
    x = grid.xs()[None, :] - cx
    y = grid.ys()[:, None] - cy
    return x * x + y * y > (fov_mm / 2.0) ** 2


def apply_scanner(
    hu: np.ndarray, head: HeadVolume, grid: ScanGrid, pose: HeadPose, profile: SiteProfile, rng: np.random.Generator
) -> np.ndarray:
    """The reconstructed image the site's scanner would store, in HU (float32 [k, r, c]).

    Cupping (``profile.cupping_hu``) brightens the cortex next to the skull and darkens the
    centre; streaks (``streak_hu``) cross the posterior fossa in the lowest slices; the kernel
    (``kernel``) sets sharpness; noise is scaled to ``noise_sigma_hu`` after the kernel (half
    of it in air); ``hu_offset`` shifts the calibration; values are clipped to [-1024, 3071].
    """
    img = hu.astype(np.float32, copy=True)
    inside_ic = head.d_ic < 0
    depth = np.clip(-head.d_ic, 0.0, None)
    img += np.where(inside_ic, profile.cupping_hu * (np.exp(-depth / 12.0) - 0.35), 0.0)

    xh, yh, zh = pose.head_coords(grid)
    weight_z = np.clip((-12.0 - zh) / 25.0, 0.0, 1.0)
    if profile.streak_hu > 0 and weight_z.any():
        streak = np.zeros(xh.shape, dtype=np.float32)
        for _ in range(int(rng.integers(3, 7))):
            ang = np.deg2rad(rng.normal(0.0, 15.0))
            y0 = rng.uniform(5.0, 35.0)
            dist = np.abs(-np.sin(ang) * xh + np.cos(ang) * (yh - y0))
            amp = profile.streak_hu * rng.uniform(0.4, 1.0) * (-1.0 if rng.random() < 0.7 else 0.6)
            streak += amp * np.exp(-((dist / rng.uniform(1.5, 3.5)) ** 2))
        img += weight_z[:, None, None] * streak[None] * (head.d_ext < 0)

    img = apply_kernel(img, profile.kernel)
    noise = apply_kernel(rng.standard_normal(grid.shape, dtype=np.float32), profile.kernel)
    noise *= profile.noise_sigma_hu / max(float(noise.std()), 1e-6)
    noise *= np.where(head.d_ext < 0, 1.0 + 0.3 * weight_z[:, None, None], 0.5)
    img += noise
    img += profile.hu_offset
    if profile.fov_circle:
        img[:, fov_outside(grid, profile.fov_mm)] = AIR_HU
    lo, hi = profile.stored_range
    hu_lo = max(MIN_HU, lo * profile.rescale_slope + profile.rescale_intercept)
    hu_hi = min(3071.0, hi * profile.rescale_slope + profile.rescale_intercept)
    np.clip(img, hu_lo, hu_hi, out=img)
    return img.astype(np.float32, copy=False)
