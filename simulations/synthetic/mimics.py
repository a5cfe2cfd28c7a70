"""Mimics and confounders: findings that look like an expansion marker but are not one.

Each patient carries every mimic with a probability (``MIMIC_RATES`` times the site's
``mimic_scale``) and a strength in (0, 1]; negatives and positives alike. What each one imitates,
and how strongly it sways a reader, is ``MIMIC_EVIDENCE``:

- ``edema``: a wide, dark peri-hematomal rim (outside the mask) - a hypodense border, not an
  island inside the clot (rendered by ``hematoma`` through the oedema width and strength);
- ``lobulation``: one shallow lobule on an otherwise smooth clot (Barras shape II, "slightly
  irregular"), short of the lobulated margin the marker means (rendered by ``hematoma``);
- ``streak``: a beam-hardening streak (dark band) across the clot;
- ``ivh``: intraventricular extension: blood layered in the dependent ventricles, a blood-CSF
  level that looks like a fluid level but lies outside the hematoma;
- ``calcification``: small bright foci next to the clot (density heterogeneity at its edge);
- ``secondary_bleed``: a small separate bleed elsewhere (not in the annotated mask).

Partial volume of thick slices is a site property, not a per-patient draw: ``partial_volume``
mixes each slice with its neighbours by the share its slab reaches into them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from simulations.synthetic.anatomy import HeadPose, HeadVolume, ScanGrid

#: Base probability of each mimic per patient (times the site's ``mimic_scale``): design
#: choices of the right order for an ICH cohort, not fitted to one publication (docs/synthetic-data.md).
MIMIC_RATES: dict[str, float] = {
    "edema": 0.30,
    "lobulation": 0.25,
    "streak": 0.15,
    "ivh": 0.30,
    "calcification": 0.20,
    "secondary_bleed": 0.08,
}
MIMICS: tuple[str, ...] = tuple(MIMIC_RATES)
#: Evidence (0..1, the severity scale of a real marker) a mimic at full strength shows a reader
#: for each marker it imitates; ``readers.READER_THRESHOLD`` is where calls become likely.
MIMIC_EVIDENCE: dict[str, dict[str, float]] = {
    "edema": {"hypodensity": 0.15, "blend_sign": 0.2},
    "lobulation": {"irregular_margin": 0.25},
    "streak": {"hypodensity": 0.2, "fluid_level": 0.1},
    "ivh": {"fluid_level": 0.2},
    "calcification": {"blend_sign": 0.15},
    "secondary_bleed": {"irregular_margin": 0.15},
}
#: Mimic strength is uniform in this range when present.
STRENGTH_RANGE: tuple[float, float] = (0.4, 1.0)


def draw_mimics(rng: np.random.Generator, scale: float) -> dict[str, float]:
    """Each mimic's strength for one patient (0 = absent); rates are ``MIMIC_RATES`` x ``scale``."""
    u = rng.random(len(MIMICS))
    s = rng.uniform(*STRENGTH_RANGE, size=len(MIMICS))
    return {m: float(s[i]) if u[i] < min(1.0, MIMIC_RATES[m] * scale) else 0.0 for i, m in enumerate(MIMICS)}


def mimic_evidence(mimics: Mapping[str, float], marker: str) -> float:
    """The strongest evidence for ``marker`` that this patient's mimics show a reader."""
    return max((MIMIC_EVIDENCE[k].get(marker, 0.0) * v for k, v in mimics.items() if v > 0), default=0.0)


def partial_volume_weight(slice_thickness_mm: float) -> float:
    """Share of each neighbouring slice mixed into a slice: 0 for thin slices, up to 0.3 at 6 mm
    (a thick slab averages what lies above and below its centre)."""
    return float(np.clip((slice_thickness_mm - 2.0) / 12.0, 0.0, 0.3))


def partial_volume(delta: np.ndarray, weight: float) -> np.ndarray:
    """Mix each slice with its neighbours: (1 - 2w) own + w above + w below (edges repeat)."""
    if weight <= 0 or delta.shape[0] < 2:
        return delta
    up = np.concatenate([delta[1:], delta[-1:]])
    down = np.concatenate([delta[:1], delta[:-1]])
    return ((1.0 - 2.0 * weight) * delta + weight * (up + down)).astype(np.float32)


def _ball(grid: ScanGrid, centre: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Partial-volume fraction of a ball (scanner mm) on its bounding box of the grid."""
    h, dz = grid.pixel_spacing, grid.slice_spacing
    idx = (np.array([centre[2], centre[1], centre[0]]) - np.array(grid.origin)[::-1]) / np.array([dz, h, h])
    half = np.array([radius / dz, radius / h, radius / h]) + 2
    lo = np.clip(np.floor(idx - half).astype(int), 0, np.array(grid.shape))
    hi = np.clip(np.ceil(idx + half).astype(int) + 1, 0, np.array(grid.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    z = grid.zs()[sl[0]][:, None, None] - centre[2]
    y = grid.ys()[sl[1]][None, :, None] - centre[1]
    x = grid.xs()[sl[2]][None, None, :] - centre[0]
    d = np.sqrt(x * x + y * y + (z * min(1.0, h / dz)) ** 2) - radius
    return sl, np.clip(0.5 - d / h, 0.0, 1.0).astype(np.float32)


def _streak(grid: ScanGrid, centre: np.ndarray, radius: float, strength: float, rng, head: HeadVolume) -> np.ndarray:
    """A dark beam-hardening band through the clot's centre, on the slices the clot spans."""
    ang = rng.uniform(0, np.pi)
    width = rng.uniform(1.5, 3.0)
    amp = -(12.0 + 28.0 * strength)
    y = grid.ys()[:, None] - centre[1]
    x = grid.xs()[None, :] - centre[0]
    band = np.exp(-(((-np.sin(ang) * x + np.cos(ang) * y) / width) ** 2)).astype(np.float32)
    near_z = np.abs(grid.zs() - centre[2]) < 0.8 * radius
    return amp * near_z[:, None, None] * band[None] * (head.d_ext < 0)


def _ivh(hu: np.ndarray, head: HeadVolume, grid: ScanGrid, strength: float, rng) -> np.ndarray:
    """Blood layered in the dependent part (+y, posterior) of the ventricles: a blood-CSF level."""
    csf = (hu > -5.0) & (hu < 20.0) & (head.d_brain < -8.0)
    out = np.zeros_like(hu)
    if not csf.any():
        return out
    ys = np.broadcast_to(grid.ys()[None, :, None], hu.shape)
    level = float(np.quantile(ys[csf], 1.0 - (0.15 + 0.35 * strength)))
    blood = rng.uniform(50.0, 68.0)
    layer = csf & (ys >= level)
    out[layer] = blood - hu[layer]
    return out


def render_mimics(
    hu: np.ndarray,
    head: HeadVolume,
    grid: ScanGrid,
    pose: HeadPose,
    clot_centre_head: tuple[float, float, float],
    clot_radius_mm: float,
    mimics: Mapping[str, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """HU change of the image-level mimics (streak, IVH, calcification, secondary bleed); edema
    and lobulation are part of the hematoma. ``hu`` is the head with its hematoma."""
    out = np.zeros(grid.shape, dtype=np.float32)
    c = pose.to_scanner(np.asarray(clot_centre_head, dtype=float))
    if mimics.get("streak", 0) > 0:
        out += _streak(grid, c, clot_radius_mm, mimics["streak"], rng, head)
    if mimics.get("ivh", 0) > 0:
        out += _ivh(hu, head, grid, mimics["ivh"], rng)
    if mimics.get("calcification", 0) > 0:
        for _ in range(int(rng.integers(1, 4))):
            d = rng.normal(size=3)
            d[2] *= 0.3
            p = c + d / np.linalg.norm(d) * (clot_radius_mm + rng.uniform(2.0, 10.0))
            sl, f = _ball(grid, p, rng.uniform(1.5, 2.5))
            out[sl] += f * (rng.uniform(200.0, 500.0) * mimics["calcification"] - hu[sl]) * (head.d_brain[sl] < 0)
    if mimics.get("secondary_bleed", 0) > 0:
        deep = np.argwhere(head.d_brain < -12.0)
        if len(deep):
            far = deep[rng.integers(len(deep), size=min(len(deep), 64))]
            pts = np.stack([grid.xs()[far[:, 2]], grid.ys()[far[:, 1]], grid.zs()[far[:, 0]]], axis=1)
            dist = np.linalg.norm(pts - c, axis=1)
            ok = pts[dist > clot_radius_mm + 20.0]
            if len(ok):
                vol_ml = rng.uniform(0.5, 3.0) * mimics["secondary_bleed"]
                r = float(np.cbrt(3.0 * vol_ml * 1000.0 / (4.0 * np.pi)))
                sl, f = _ball(grid, ok[0], r)
                out[sl] += f * (rng.uniform(58.0, 75.0) - hu[sl])
    return out
