"""A 3-D head phantom in Hounsfield units: scalp, skull, CSF spaces, grey and white matter.

Built from analytic (signed-distance-like) shapes evaluated on the scan grid, so neighbouring
slices agree and the same patient can be re-scanned in another position (follow-up). Distances
are in mm; the head frame is LPS with its origin near the third ventricle (x left, y posterior,
z superior). Tissue values follow typical non-contrast head CT (grey ~40, white ~27, CSF ~5 HU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import AIR_HU


@dataclass(frozen=True)
class ScanGrid:
    """An axial voxel grid in DICOM patient coordinates (LPS, mm), standard orientation.

    ``row_dir`` = (1, 0, 0) (increasing column index c), ``col_dir`` = (0, 1, 0) (increasing
    row index r), slices along +z (docs/design.md §8). ``origin`` is voxel [0, 0, 0].
    """

    shape: tuple[int, int, int]
    pixel_spacing: float
    slice_spacing: float
    origin: tuple[float, float, float]

    def xs(self) -> np.ndarray:
        return self.origin[0] + np.arange(self.shape[2]) * self.pixel_spacing

    def ys(self) -> np.ndarray:
        return self.origin[1] + np.arange(self.shape[1]) * self.pixel_spacing

    def zs(self) -> np.ndarray:
        return self.origin[2] + np.arange(self.shape[0]) * self.slice_spacing

    @property
    def centre_xy(self) -> tuple[float, float]:
        return (float(self.xs().mean()), float(self.ys().mean()))

    @property
    def voxel_ml(self) -> float:
        return self.pixel_spacing**2 * self.slice_spacing / 1000.0

    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix taking (k, r, c, 1) to LPS (x, y, z, 1)."""
        m = np.zeros((4, 4))
        m[2, 0] = self.slice_spacing
        m[1, 1] = self.pixel_spacing
        m[0, 2] = self.pixel_spacing
        m[:3, 3] = self.origin
        m[3, 3] = 1.0
        return m


@dataclass(frozen=True)
class HeadPose:
    """Where the head lies in the scanner: its frame origin (LPS, mm) and in-plane rotation."""

    centre: tuple[float, float, float]
    tilt_deg: float

    def head_coords(self, grid: ScanGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Head-frame coordinates of the grid: x, y as (R, C) planes, z as (K,)."""
        t = np.deg2rad(self.tilt_deg)
        dx = grid.xs()[None, :] - self.centre[0]
        dy = grid.ys()[:, None] - self.centre[1]
        ct, st = np.cos(t), np.sin(t)
        xh = (ct * dx + st * dy).astype(np.float32)
        yh = (-st * dx + ct * dy).astype(np.float32)
        zh = (grid.zs() - self.centre[2]).astype(np.float32)
        return xh, yh, zh

    def to_scanner(self, p: np.ndarray) -> np.ndarray:
        """Head-frame point(s) (..., 3) -> scanner LPS."""
        t = np.deg2rad(self.tilt_deg)
        ct, st = np.cos(t), np.sin(t)
        p = np.asarray(p, dtype=float)
        x = ct * p[..., 0] - st * p[..., 1] + self.centre[0]
        y = st * p[..., 0] + ct * p[..., 1] + self.centre[1]
        return np.stack([x, y, p[..., 2] + self.centre[2]], axis=-1)


@dataclass(frozen=True)
class HeadAnatomy:
    """One patient's head: sizes, tissue values and age-related atrophy.

    The same anatomy is reused for the patient's follow-up scan.
    """

    scale: tuple[float, float, float]
    atrophy: float
    csf_gap_mm: float
    skull_mm: float
    scalp_fat_mm: float
    temporal_muscle_mm: float
    hu_grey: float
    hu_white: float
    hu_csf: float
    hu_cortical_bone: float
    hu_diploe: float
    ventricle_scale: float
    sulcal_waves: tuple[tuple[float, float, float, float], ...]
    folia_waves: tuple[tuple[float, float, float, float], ...]
    pineal_calcified: bool
    plexus_calcified: bool


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> tuple:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength, size=n)
    ph = rng.uniform(0, 2 * np.pi, size=n)
    return tuple((float(d[0] * kk), float(d[1] * kk), float(d[2] * kk), float(p)) for d, kk, p in zip(dirs, k, ph))


def sample_anatomy(rng: np.random.Generator) -> HeadAnatomy:
    """Draw a patient's head: size and shape, skull and scalp, atrophy (wider CSF spaces)."""
    atrophy = float(rng.beta(2.0, 2.5))
    s = rng.normal(1.0, 0.04, size=3).clip(0.9, 1.1)
    return HeadAnatomy(
        scale=(float(s[0]), float(s[1]), float(s[2])),
        atrophy=atrophy,
        csf_gap_mm=float(1.2 + 2.8 * atrophy + rng.uniform(0, 0.5)),
        skull_mm=float(rng.uniform(5.0, 8.0)),
        scalp_fat_mm=float(rng.uniform(2.0, 6.0)),
        temporal_muscle_mm=float(rng.uniform(4.0, 9.0)),
        hu_grey=float(rng.uniform(37.0, 42.0)),
        hu_white=float(rng.uniform(24.0, 29.0)),
        hu_csf=float(rng.uniform(3.0, 9.0)),
        hu_cortical_bone=float(rng.uniform(1100.0, 1500.0)),
        hu_diploe=float(rng.uniform(450.0, 750.0)),
        ventricle_scale=float(0.8 + 0.8 * atrophy + rng.uniform(-0.05, 0.1)),
        sulcal_waves=_waves(rng, 8, (16.0, 24.0)),
        folia_waves=_waves(rng, 5, (8.0, 12.0)),
        pineal_calcified=bool(rng.random() < 0.5),
        plexus_calcified=bool(rng.random() < 0.4),
    )


@dataclass(frozen=True)
class HeadVolume:
    """The phantom on a grid plus the distance fields the hematoma and scanner steps need.

    ``hu`` float32 [k, r, c]; ``d_brain`` / ``d_ic`` / ``d_ext``: approximate signed distance
    (mm, negative inside) to the brain surface, the inner skull table and the skin.
    """

    hu: np.ndarray
    d_brain: np.ndarray
    d_ic: np.ndarray
    d_ext: np.ndarray


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: a rounded union of two distance fields."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _radial_sd(x: np.ndarray, y: np.ndarray, z: np.ndarray, c, a) -> np.ndarray:
    """Distance (mm) to an ellipsoid surface along the ray from its centre; exact for spheres."""
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    p = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-3
    rho = np.sqrt((dx / a[0]) ** 2 + (dy / a[1]) ** 2 + (dz / a[2]) ** 2) + 1e-6
    return p - p / rho


def _soft(sd: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume fraction inside a surface, from a signed distance and the pixel size."""
    return np.clip(0.5 - sd / h, 0.0, 1.0)


def _paint(hu: np.ndarray, frac: np.ndarray, value: float) -> None:
    hu += frac * (value - hu)


def _ellipsoid_block(xh, yh, zh, c, a, margin):
    """Bounding block of an axis-aligned ellipsoid on the grid and its approximate sd there."""
    ks = np.nonzero(np.abs(zh - c[2]) <= a[2] + margin)[0]
    if ks.size == 0:
        return None
    foot = ((xh - c[0]) / (a[0] + margin)) ** 2 + ((yh - c[1]) / (a[1] + margin)) ** 2 <= 1.0
    rows = np.nonzero(foot.any(axis=1))[0]
    cols = np.nonzero(foot.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        return None
    sl = (slice(ks[0], ks[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    x = xh[sl[1], sl[2]][None]
    y = yh[sl[1], sl[2]][None]
    z = zh[sl[0]][:, None, None]
    rho = np.sqrt(((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2)
    sd = (rho - 1.0) * float(np.cbrt(a[0] * a[1] * a[2]))
    return sl, sd


def _paint_ellipsoid(hu, xh, yh, zh, c, a, value, h, where=None) -> None:
    blk = _ellipsoid_block(xh, yh, zh, c, a, h)
    if blk is None:
        return
    sl, sd = blk
    f = _soft(sd, h)
    if where is not None:
        f = f * where[sl]
    _paint(hu[sl], f, value)


def _wave_field(waves, x, y, z) -> np.ndarray:
    """Sum of plane waves, normalised to unit variance: its zero set meanders like sulci."""
    n = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for kx, ky, kz, ph in waves:
        n += np.cos(kx * x + ky * y + kz * z + ph)
    return n / np.sqrt(len(waves) / 2.0)


def brain_distances(anat: HeadAnatomy, xh, yh, zh) -> dict[str, np.ndarray]:
    """Signed distances (mm) of cerebrum, cerebellum, brainstem, brain and face on the grid."""
    sx, sy, sz = anat.scale
    x, y, z = xh[None], yh[None], zh[:, None, None]
    # Cerebrum: flatter below its centre, cut by the sloping anterior-fossa floor.
    cz = 8.0 * sz
    az = np.where(zh > cz, 70.0 * sz, 50.0 * sz).astype(np.float32)[:, None, None]
    d_cb = _radial_sd(x, y, z, (0.0, 4.0 * sy, cz), (64.0 * sx, 80.0 * sy, az))
    floor = (-44.0 + 0.45 * np.maximum(0.0, -yh - 10.0))[None] * sz
    d_cb = np.maximum(d_cb, floor - z)
    d_cbl = _radial_sd(x, y, z, (0.0, 44.0 * sy, -40.0 * sz), (50.0 * sx, 33.0 * sy, 24.0 * sz))
    d_bs = _radial_sd(x, y, z, (0.0, 14.0 * sy, -32.0 * sz), (14.0, 14.0, 30.0 * sz))
    d_brain = _smin(_smin(d_cb, d_cbl, 6.0), d_bs, 4.0)
    d_face = _radial_sd(x, y, z, (0.0, -38.0 * sy, -50.0 * sz), (60.0 * sx, 58.0 * sy, 30.0 * sz))
    return {"cerebrum": d_cb, "cerebellum": d_cbl, "brainstem": d_bs, "brain": d_brain, "face": d_face}


def make_head(anat: HeadAnatomy, grid: ScanGrid, pose: HeadPose) -> HeadVolume:
    """Render the patient's head on the scan grid (before any scanner effect).

    Layers are painted from the outside in (skin, fat, muscle, bone, CSF, brain, nuclei,
    ventricles), each with a partial-volume edge one pixel wide.
    """
    h = grid.pixel_spacing
    xh, yh, zh = pose.head_coords(grid)
    d = brain_distances(anat, xh, yh, zh)
    d_brain = d["brain"].astype(np.float32)
    d_ic = (d_brain - anat.csf_gap_mm).astype(np.float32)
    scalp = anat.scalp_fat_mm + 3.5
    d_ext = _smin(d_ic - anat.skull_mm - scalp, d["face"], 6.0).astype(np.float32)
    x, z = xh[None], zh[:, None, None]

    hu = np.full(grid.shape, AIR_HU, dtype=np.float32)
    _paint(hu, _soft(d_ext, h), 45.0)  # skin
    _paint(hu, _soft(d_ext + 2.0, h), -100.0)  # subcutaneous fat
    # Galea plus temporalis: thicker laterally, around the level of the temples.
    temporal = (
        anat.temporal_muscle_mm
        * np.clip(np.abs(x) / (55.0 * anat.scale[0]) - 0.5, 0, 1)
        * np.exp(-(((z - 5.0) / 30.0) ** 2))
    )
    _paint(hu, _soft(d_ic - anat.skull_mm - 1.5 - temporal, h), 45.0)
    _paint(hu, _soft(d["face"] + 8.0, h), 40.0)  # facial soft tissue
    _paint(hu, _soft(d_ic - anat.skull_mm, h), anat.hu_cortical_bone)
    _paint(hu, _soft(d_ic - anat.skull_mm + 1.8, h), anat.hu_diploe)
    _paint(hu, _soft(d_ic - 1.5, h), anat.hu_cortical_bone)  # inner table
    outside_ic = np.clip(d_ic / 2.0, 0, 1)
    sx, sy, sz = anat.scale
    for side in (-1.0, 1.0):  # orbits, globes
        c = (side * 32.0 * sx, -62.0 * sy, -30.0 * sz)
        _paint_ellipsoid(hu, xh, yh, zh, c, (15.0, 20.0, 13.0), 500.0, h, outside_ic)
        _paint_ellipsoid(hu, xh, yh, zh, c, (13.0, 18.0, 11.0), -90.0, h, outside_ic)
        _paint_ellipsoid(hu, xh, yh, zh, (c[0], c[1] - 8.0, c[2]), (11.5, 11.5, 11.5), 12.0, h, outside_ic)
    _paint_ellipsoid(
        hu, xh, yh, zh, (0.0, -52.0 * sy, -36.0 * sz), (10.0, 20.0, 12.0), -900.0, h, outside_ic
    )  # ethmoid / sphenoid air

    _paint(hu, _soft(d_ic, h), anat.hu_csf)  # extra-axial CSF
    f_brain = _soft(d_brain, h)
    _paint(hu, f_brain, anat.hu_white)
    _paint(hu, f_brain * _soft(d["cerebellum"], h), anat.hu_grey - 4.0)
    _paint(hu, f_brain * _soft(d["brainstem"], h) * np.clip((-16.0 - z) / 6.0, 0, 1), anat.hu_white + 4.0)
    _paint_cortex(hu, anat, d, xh, yh, zh, h)
    _paint_deep_structures(hu, anat, xh, yh, zh, h, f_brain)
    return HeadVolume(hu=hu, d_brain=d_brain, d_ic=d_ic, d_ext=d_ext)


def _paint_cortex(hu, anat: HeadAnatomy, d, xh, yh, zh, h) -> None:
    """Cortical ribbon and CSF-filled sulci near the surface; interhemispheric fissure."""
    depth_max = 9.0 + 5.0 * anat.atrophy
    shell = (d["brain"] < 0.5 * h) & (d["brain"] > -(depth_max + 4.0))
    idx = np.nonzero(shell)
    if idx[0].size:
        x = xh[idx[1], idx[2]]
        y = yh[idx[1], idx[2]]
        z = zh[idx[0]]
        depth = -d["brain"][idx]
        in_cbl = d["cerebellum"][idx] < 0
        n = np.where(in_cbl, _wave_field(anat.folia_waves, x, y, z), _wave_field(anat.sulcal_waves, x, y, z))
        taper = np.clip(1.0 - depth / depth_max, 0.0, 1.0)
        w = (0.12 + 0.25 * anat.atrophy) * taper
        ribbon = np.clip(1.0 - depth / (depth_max + 4.0), 0.0, 1.0) * 0.5 + 0.05
        an = np.abs(n)
        grey = np.clip((w + ribbon - an) / 0.15 + 0.5, 0, 1) * (depth < depth_max + 4.0)
        grey = np.maximum(grey, np.clip((3.5 - depth) / 1.0, 0, 1) * (~in_cbl))
        v = hu[idx]
        v += grey * (np.where(in_cbl, anat.hu_grey - 2.0, anat.hu_grey) - v)
        csf = np.clip((w - an) / 0.1 + 0.5, 0, 1) * (taper > 0)
        v += csf * (anat.hu_csf - v)
        hu[idx] = v
    # Interhemispheric fissure above the corpus callosum and at the poles.
    half = 0.8 + 1.8 * anat.atrophy
    fis = _soft(np.abs(xh)[None] - half, h) * (d["cerebrum"] < 0) * (d["brain"] < 0)
    above_callosum = np.clip((zh[:, None, None] - 22.0) / 4.0, 0, 1)
    poles = np.clip((np.abs(yh)[None] - 42.0) / 4.0, 0, 1)
    zone = above_callosum + poles
    _paint(hu, fis * np.clip(zone, 0, 1), anat.hu_csf)


def _paint_deep_structures(hu, anat: HeadAnatomy, xh, yh, zh, h, f_brain) -> None:
    """Basal ganglia, thalami, ventricles (lateral, third, fourth) and calcifications."""
    g, wm, csf = anat.hu_grey, anat.hu_white, anat.hu_csf
    v = anat.ventricle_scale
    sv = float(np.sqrt(v))
    for s in (-1.0, 1.0):
        if anat.atrophy > 0.35:  # periventricular hypodensity
            _paint_ellipsoid(
                hu, xh, yh, zh, (s * 13.0 * sv, 0.0, 18.0), (10.0 * v, 26.0, 10.0), wm - 6.0 * anat.atrophy, h, f_brain
            )
        _paint_ellipsoid(hu, xh, yh, zh, (s * 24.0, -2.0, 2.0), (6.0, 15.0, 10.0), g - 2.0, h)
        _paint_ellipsoid(hu, xh, yh, zh, (s * 18.0, 0.0, 0.0), (4.0, 8.0, 6.0), g - 5.0, h)
        _paint_ellipsoid(hu, xh, yh, zh, (s * 13.0, -14.0, 12.0), (5.0, 9.0, 9.0), g - 2.0, h)
        _paint_ellipsoid(hu, xh, yh, zh, (s * 10.0, 13.0, 4.0), (9.0, 14.0, 9.0), g - 3.0, h)
    for s in (-1.0, 1.0):
        parts = (
            ((s * 11.0 * sv, -22.0, 14.0), (4.0, 12.0, 8.0)),  # frontal horn
            ((s * 12.0 * sv, 2.0, 19.0), (5.0, 20.0, 5.0)),  # body
            ((s * 19.0 * sv, 28.0, 12.0), (7.0, 10.0, 8.0)),  # atrium
            ((s * 17.0 * sv, 41.0, 8.0), (3.5, 9.0, 4.5)),  # occipital horn
            ((s * 29.0, 2.0, -14.0), (2.5, 13.0, 3.5)),
        )  # temporal horn
        for c, a in parts:
            _paint_ellipsoid(hu, xh, yh, zh, c, (a[0] * v, a[1] * min(v, 1.2), a[2] * v), csf, h)
        if anat.plexus_calcified:
            _paint_ellipsoid(hu, xh, yh, zh, (s * 19.0 * sv, 30.0, 12.0), (2.5, 2.5, 2.5), 180.0, h)
    _paint_ellipsoid(hu, xh, yh, zh, (0.0, 5.0, 0.0), (1.5 * v, 13.0, 9.0), csf, h)  # third
    _paint_ellipsoid(hu, xh, yh, zh, (0.0, 36.0, -36.0), (6.0, 4.0, 6.0), csf, h)  # fourth
    if anat.pineal_calcified:
        _paint_ellipsoid(hu, xh, yh, zh, (0.0, 22.0, 6.0), (2.0, 2.0, 2.0), 160.0, h)
