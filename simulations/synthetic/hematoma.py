"""Intracerebral hematomas in 3-D, with the four expansion markers built to their definitions,
each at a severity from 0 (barely there) to 1 (obvious) (``SEVERITY_SCALE``).

Each marker is made independently of the others and of the hematoma's size (docs/design.md §1):
- hypodensity: hypodense island(s) 15-45 HU darker than the clot median (the black hole sign's
  >= 28 HU from severity ~0.45 up), enclosed by dense clot in-plane and above and below; radius
  and a second island grow with severity;
- irregular_margin: one to four lobules on the border, shallow to deep (Barras shape III to V);
  a smooth ellipsoid otherwise, or one shallow lobule (shape II) when the ``lobulation`` mimic is on;
- blend_sign: a hypodense cap 18-40 HU darker than the dense part (>= 18 HU by definition),
  reaching the border, its boundary from blurred (3 pixels) to sharp (1 pixel); never split along
  gravity so it is not a fluid level;
- fluid_level: lighter serum 12-40 HU over denser cells, split by a plane perpendicular to gravity;
  the dense layer is dependent (posterior, +y, larger row index r) whatever the head's tilt.
Sizes are proportional to the hematoma so that an obvious marker stays visible at 64x64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage

from common.config import MARKERS
from simulations.synthetic.anatomy import HeadAnatomy, HeadPose, HeadVolume, ScanGrid

#: Volume range (ml) by location: infratentorial bleeds are smaller.
VOLUME_RANGE_ML: dict[str, tuple[float, float]] = {
    "putamen": (5.0, 60.0),
    "thalamus": (5.0, 35.0),
    "subcortical": (5.0, 60.0),
    "cerebellum": (5.0, 30.0),
    "brainstem": (5.0, 12.0),
}
#: Smallest volume of a hematoma that carries a marker (markers need room to be seen).
MARKER_MIN_VOLUME_ML = 12.0
#: Per marker parameter: its value at severity 0 and at severity 1 (linear in between).
SEVERITY_SCALE: dict[str, tuple[float, float]] = {
    "island_delta_hu": (15.0, 45.0),
    "island_rel_radius": (0.14, 0.42),
    "lobes": (1.0, 4.0),
    "lobe_rel_radius": (0.30, 0.56),
    "blend_delta_hu": (18.0, 40.0),
    "blend_edge_px": (3.0, 1.0),
    "blend_cap_frac": (0.15, 0.35),
    "fluid_serum_delta_hu": (12.0, 40.0),
}
#: Oedema (mm, strength) of an ordinary clot, and of the ``edema`` mimic at full strength.
OEDEMA_USUAL: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 5.0), (0.25, 0.6))
OEDEMA_MIMIC: tuple[tuple[float, float], tuple[float, float]] = ((6.0, 10.0), (0.6, 0.9))


def at_severity(name: str, severity: float) -> float:
    """``SEVERITY_SCALE[name]`` at ``severity`` (0..1)."""
    a, b = SEVERITY_SCALE[name]
    return float(a + (b - a) * np.clip(severity, 0.0, 1.0))


def draw_volume_ml(rng: np.random.Generator, location: str, with_marker: bool) -> float:
    """Baseline volume (ml), log-uniform over the location's range (markers need >= 12 ml)."""
    lo, hi = VOLUME_RANGE_ML[location]
    if with_marker:
        lo = min(max(lo, MARKER_MIN_VOLUME_ML), hi)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


@dataclass(frozen=True)
class HematomaSpec:
    """The drawn parameters of one hematoma; rendering it on any grid and pose is deterministic.

    Geometry is in the head frame (mm); ``axes`` are the semi-axes of the base ellipsoid in its
    own frame (rotated by ``yaw_deg`` in-plane and ``pitch_deg`` about its long axis).
    """

    location: str
    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    yaw_deg: float
    pitch_deg: float
    target_ml: float
    lobes: tuple[tuple[float, float, float, float], ...]  # unit direction (3) + radius mm
    clot_hu: float
    texture: tuple[tuple[float, float, float, float], ...]
    markers: Mapping[str, bool]
    island_rel_radius: float = 0.38
    island_delta_hu: float = 35.0
    second_island: bool = False
    blend_angle_deg: float = 0.0
    blend_cap_frac: float = 0.3
    blend_delta_hu: float = 28.0
    blend_curvature: float = 0.0
    blend_edge_px: float = 1.0
    fluid_dependent_frac: float = 0.5
    fluid_serum_delta_hu: float = 35.0
    fluid_cells_delta_hu: float = 8.0
    oedema_mm: float = 3.0
    oedema_strength: float = 0.4

    @property
    def radius_eq(self) -> float:
        """Radius (mm) of the sphere with the target volume."""
        return float(np.cbrt(3.0 * self.target_ml * 1000.0 / (4.0 * np.pi)))


def _centre_for(
    rng: np.random.Generator, location: str, anat: HeadAnatomy, r_eq: float
) -> tuple[tuple[float, float, float], float]:
    """Head-frame centre of a bleed at ``location`` (either side) and its long axis (deg)."""
    sx, sy, sz = anat.scale
    side = float(rng.choice([-1.0, 1.0]))

    def jitter(sd: float) -> float:
        return float(rng.normal(0, sd))

    yaw = 90.0  # long axis antero-posterior
    if location == "putamen":
        c = (side * 24.0 + jitter(2), -2.0 + jitter(3), 2.0 + jitter(3))
    elif location == "thalamus":
        c = (side * 11.0 + jitter(1.5), 13.0 + jitter(2), 5.0 + jitter(2))
    elif location == "subcortical":
        # Lobar: deep enough in a hemisphere that the clot fits under the cortex.
        phi = rng.uniform(-1.2, 1.2) + (0.0 if side > 0 else np.pi)
        zc = rng.uniform(5.0, 45.0)
        s = np.sqrt(max(0.2, 1.0 - ((zc - 8.0) / 70.0) ** 2))
        depth = r_eq + 6.0
        tx = max(0.3, 1.0 - depth / (64.0 * s))
        ty = max(0.3, 1.0 - depth / (80.0 * s))
        c = (tx * 64.0 * s * np.cos(phi), 4.0 + ty * 80.0 * s * np.sin(phi), zc)
        yaw = rng.uniform(0, 180)
    elif location == "cerebellum":
        c = (side * 20.0 + jitter(3), 46.0 + jitter(3), -34.0 + jitter(2))
        yaw = rng.uniform(0, 180)
    elif location == "brainstem":
        c = (jitter(1.5), 16.0 + jitter(2), -26.0 + jitter(3))
    else:
        raise KeyError(f"unknown location {location!r}; valid: {sorted(VOLUME_RANGE_ML)}")
    return (float(c[0] * sx), float(c[1] * sy), float(c[2] * sz)), float(yaw + rng.normal(0, 12))


def sample_hematoma_spec(
    rng: np.random.Generator,
    location: str,
    markers: Mapping[str, bool],
    anat: HeadAnatomy,
    severity: Mapping[str, float] | None = None,
    volume_ml: float | None = None,
    mimics: Mapping[str, float] | None = None,
) -> HematomaSpec:
    """Draw a hematoma at ``location`` carrying exactly the requested markers.

    ``severity`` per marker (0..1; missing = 1, obvious), ``volume_ml`` the planned volume (drawn
    when None), ``mimics`` the strengths of the mimics drawn in the hematoma itself (``edema``,
    ``lobulation``).
    """
    sev = {m: 1.0 for m in MARKERS} | dict(severity or {})
    mim = dict(mimics or {})
    vol = float(volume_ml) if volume_ml is not None else draw_volume_ml(rng, location, any(markers.values()))
    r_eq = float(np.cbrt(3.0 * vol * 1000.0 / (4.0 * np.pi)))
    centre, yaw = _centre_for(rng, location, anat, r_eq)
    e = np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.65, 1.0)])
    axes = r_eq * e / np.cbrt(e.prod())
    lobes: list[tuple[float, float, float, float]] = []
    if markers.get("irregular_margin"):
        axes = axes * 0.9  # lobules add the rest of the volume
        n = int(round(at_severity("lobes", sev["irregular_margin"])))
        rel = at_severity("lobe_rel_radius", sev["irregular_margin"])
        lobes = _lobes(rng, n, rel * r_eq, 0.06 * r_eq)
    elif mim.get("lobulation", 0) > 0:  # Barras shape II: one shallow bump, not the marker
        lobes = _lobes(rng, 1, (0.18 + 0.1 * mim["lobulation"]) * r_eq, 0.0)
    texture = tuple(
        (float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi)))
        for k in rng.normal(0, 2 * np.pi / 14.0, size=(3, 3))
    )
    blend_angle = rng.uniform(-55.0, 55.0) + (180.0 if rng.random() < 0.5 else 0.0)
    # An island needs dense clot around it: leave room when other density markers are present.
    crowded = bool(markers.get("hypodensity")) and (bool(markers.get("blend_sign")) or bool(markers.get("fluid_level")))
    cap = at_severity("blend_cap_frac", sev["blend_sign"]) * (0.75 if crowded else 1.0)
    oedema = OEDEMA_MIMIC if mim.get("edema", 0) > 0 else OEDEMA_USUAL
    jitter = rng.uniform(0.0, 1.0, size=6)
    return HematomaSpec(
        location=location,
        centre=centre,
        axes=tuple(float(a) for a in axes),
        yaw_deg=yaw,
        pitch_deg=float(rng.normal(0, 8)),
        target_ml=vol,
        lobes=tuple(lobes),
        clot_hu=float(rng.uniform(62.0, 78.0)),
        texture=texture,
        markers={m: bool(markers.get(m, False)) for m in MARKERS},
        island_rel_radius=at_severity("island_rel_radius", sev["hypodensity"]),
        island_delta_hu=at_severity("island_delta_hu", sev["hypodensity"]),
        second_island=bool(sev["hypodensity"] > 0.6 and jitter[0] < 0.35),
        blend_angle_deg=float(blend_angle),
        blend_cap_frac=float(cap),
        blend_delta_hu=at_severity("blend_delta_hu", sev["blend_sign"]),
        blend_curvature=float(rng.uniform(-0.5, 0.5)),
        blend_edge_px=at_severity("blend_edge_px", sev["blend_sign"]),
        fluid_dependent_frac=float(0.6 + 0.12 * jitter[1] if crowded else 0.35 + 0.25 * jitter[1]),
        fluid_serum_delta_hu=at_severity("fluid_serum_delta_hu", sev["fluid_level"]),
        fluid_cells_delta_hu=float(4.0 + 8.0 * jitter[2]),
        oedema_mm=float(oedema[0][0] + (oedema[0][1] - oedema[0][0]) * jitter[3]),
        oedema_strength=float(oedema[1][0] + (oedema[1][1] - oedema[1][0]) * jitter[4]),
    )


def _lobes(
    rng: np.random.Generator, n: int, radius: float, radius_sd: float
) -> list[tuple[float, float, float, float]]:
    """``n`` lobules spread round the clot: unit direction and radius (mm) each."""
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.arange(n) * (2 * np.pi / max(n, 1)) + rng.uniform(-0.3, 0.3, n)
    out = []
    for a in angles:
        d = np.array([np.cos(a), np.sin(a), rng.normal(0, 0.2)])
        d /= np.linalg.norm(d)
        out.append((float(d[0]), float(d[1]), float(d[2]), float(max(radius + rng.normal(0, radius_sd), 0.1))))
    return out


def grow_hematoma(spec: HematomaSpec, ratio: float, rng: np.random.Generator) -> HematomaSpec:
    """The same bleed at follow-up, ``ratio`` times the volume; the shape (lobules) persists,
    the density markers of the acute phase do not (follow-up rows carry no marker labels)."""
    s = float(np.cbrt(ratio))
    return replace(
        spec,
        axes=tuple(a * s for a in spec.axes),
        target_ml=spec.target_ml * ratio,
        lobes=tuple((l[0], l[1], l[2], l[3] * s) for l in spec.lobes),
        clot_hu=float(np.clip(spec.clot_hu + rng.uniform(-3.0, 5.0), 60.0, 82.0)),
        markers={m: (m == "irregular_margin" and spec.markers.get(m, False)) for m in MARKERS},
        oedema_mm=spec.oedema_mm + float(rng.uniform(1.0, 3.0)),
        oedema_strength=min(0.8, spec.oedema_strength + 0.15),
    )


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Columns: the hematoma's own axes in the head frame."""
    y, p = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rz @ rx


def _inplane_erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    st = np.zeros((1, 3, 3), dtype=bool)
    st[0] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, st, iterations=iterations, border_value=0)


def _z_erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[0] = False
    out[-1] = False
    return out


def make_hematoma(
    spec: HematomaSpec, grid: ScanGrid, pose: HeadPose, head: HeadVolume, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render a hematoma into a head: HU change to add, true mask, and what was realised.

    Returns ``(hu_delta, mask, info)``: float32 and bool arrays of ``grid.shape``; ``info`` has
    the mask volume (ml), the markers actually present (a marker that found no room, e.g. an
    island in a clot too thin to enclose it, is reported absent) and good slices to show them.
    """
    h = grid.pixel_spacing
    K, R, C = grid.shape
    r_eq = spec.radius_eq
    ext = max(spec.axes) * (1.25 if spec.lobes else 1.0) + (2.0 * r_eq if spec.lobes else 0.0)
    ext += spec.oedema_mm * 3 + 2 * h
    cs = pose.to_scanner(np.array(spec.centre))
    ci = (np.array([cs[2], cs[1], cs[0]]) - np.array(grid.origin)[::-1]) / np.array([grid.slice_spacing, h, h])
    half = np.array([ext / grid.slice_spacing, ext / h, ext / h])
    lo = np.maximum(np.floor(ci - half).astype(int), 0)
    hi = np.minimum(np.ceil(ci + half).astype(int) + 1, np.array(grid.shape))
    hu_delta = np.zeros(grid.shape, dtype=np.float32)
    mask = np.zeros(grid.shape, dtype=bool)
    info: dict[str, Any] = {
        "location": spec.location,
        "volume_ml": 0.0,
        "markers": {m: False for m in MARKERS},
        "slices": {},
    }
    if np.any(hi <= lo):
        return hu_delta, mask, info
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    # Crop coordinates: scanner -> head frame -> hematoma frame.
    zs = grid.zs()[sl[0]][:, None, None]
    ys = grid.ys()[sl[1]][None, :, None]
    xs = grid.xs()[sl[2]][None, None, :]
    t = np.deg2rad(pose.tilt_deg)
    dx, dy, dz = xs - pose.centre[0], ys - pose.centre[1], zs - pose.centre[2]
    ph = (
        np.cos(t) * dx + np.sin(t) * dy - spec.centre[0],
        -np.sin(t) * dx + np.cos(t) * dy - spec.centre[1],
        dz - spec.centre[2],
    )
    rot = _rotation(spec.yaw_deg, spec.pitch_deg)
    q = [rot[0, i] * ph[0] + rot[1, i] * ph[1] + rot[2, i] * ph[2] for i in range(3)]
    a = spec.axes
    pn = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-3
    rho = np.sqrt((q[0] / a[0]) ** 2 + (q[1] / a[1]) ** 2 + (q[2] / a[2]) ** 2) + 1e-6
    sd = pn - pn / rho
    for ux, uy, uz, rad in spec.lobes:
        u = np.array([ux, uy, uz])
        reach = 1.0 / np.sqrt((ux / a[0]) ** 2 + (uy / a[1]) ** 2 + (uz / a[2]) ** 2)
        lc = u * (reach + 0.3 * rad)
        sd = np.minimum(sd, np.sqrt((q[0] - lc[0]) ** 2 + (q[1] - lc[1]) ** 2 + (q[2] - lc[2]) ** 2) - rad)
    sd = np.maximum(sd, head.d_ic[sl] + 1.0)  # stays inside the skull
    sd = np.broadcast_to(sd, tuple(b - a_ for a_, b in zip(lo, hi)))
    frac = np.clip(0.5 - sd / h, 0.0, 1.0).astype(np.float32)
    m = sd <= 0.0
    if not m.any():
        return hu_delta, mask, info

    clot = np.full(m.shape, spec.clot_hu, dtype=np.float32)
    for kx, ky, kz, p in spec.texture:
        clot += 1.5 * np.cos(kx * q[0] + ky * q[1] + kz * q[2] + p)
    realised = {mk: False for mk in MARKERS}
    realised["irregular_margin"] = bool(spec.markers.get("irregular_margin")) and bool(spec.lobes)
    ys_b = np.broadcast_to(ys, m.shape)
    if spec.markers.get("fluid_level"):
        # Gravity is the scanner's +y: the level is a row-aligned plane, whatever the tilt.
        level = float(np.quantile(ys_b[m], 1.0 - spec.fluid_dependent_frac))
        w = np.clip(0.5 + (ys_b - level) / h, 0.0, 1.0)
        serum = spec.clot_hu - spec.fluid_serum_delta_hu
        cells = spec.clot_hu + spec.fluid_cells_delta_hu
        clot = clot + (serum - spec.clot_hu) * (1.0 - w) + (cells - spec.clot_hu) * w
        realised["fluid_level"] = bool((m & (w < 0.5)).any() and (m & (w > 0.5)).any())
    blend_w = None
    if spec.markers.get("blend_sign"):
        ang = np.deg2rad(spec.blend_angle_deg)
        n = np.array([np.cos(ang), np.sin(ang)])
        rx, ry = xs - cs[0], ys - cs[1]
        proj = n[0] * rx + n[1] * ry
        perp2 = (-n[1] * rx + n[0] * ry) ** 2 + (zs - cs[2]) ** 2
        proj = np.broadcast_to(proj + spec.blend_curvature * perp2 / (2.0 * r_eq), m.shape)
        cut = float(np.quantile(proj[m], 1.0 - spec.blend_cap_frac))
        blend_w = np.clip(0.5 + (proj - cut) / (h * spec.blend_edge_px), 0.0, 1.0)
        clot = clot + (spec.clot_hu - spec.blend_delta_hu - clot) * blend_w
        realised["blend_sign"] = bool((m & (blend_w > 0.5)).sum() >= 4)
    island = np.zeros(m.shape, dtype=bool)
    if spec.markers.get("hypodensity"):
        island = _place_islands(spec, m, clot, grid, rng)
        if island.sum(axis=(1, 2)).max(initial=0) >= 3:  # visible: >= 3 pixels on a slice
            dark = float(np.median(clot[m])) - spec.island_delta_hu
            clot = np.where(island, dark, clot)
            realised["hypodensity"] = True
        else:  # no room: the study is negative
            island[:] = False

    tissue = head.hu[sl]
    brainlike = ((tissue > 12.0) & (tissue < 55.0) & (head.d_brain[sl] < 0)).astype(np.float32)
    oed = np.where(sd > 0, np.exp(-np.maximum(sd, 0) / spec.oedema_mm), 0.0)
    oed_delta = -spec.oedema_strength * oed * brainlike * (tissue - 15.0)
    hu_delta[sl] = frac * (clot - tissue) + (1.0 - frac) * oed_delta
    mask[sl] = m

    area = m.sum(axis=(1, 2))
    best = int(np.argmax(area))
    slices = {
        "largest": lo[0] + best,
        "irregular_margin": lo[0] + best,
        "fluid_level": lo[0] + best,
        "hypodensity": lo[0] + best,
        "blend_sign": lo[0] + best,
    }
    if island.any():
        slices["hypodensity"] = lo[0] + int(np.argmax(island.sum(axis=(1, 2))))
    if blend_w is not None:
        slices["blend_sign"] = lo[0] + int(np.argmax((m & (blend_w > 0.5)).sum(axis=(1, 2)) * (area > 0)))
    info.update(
        volume_ml=float(m.sum() * grid.voxel_ml),
        markers=realised,
        slices={k: int(v) for k, v in slices.items()},
        centre_index=tuple(float(v) for v in ci),
        radius_eq_mm=r_eq,
        clot_hu=spec.clot_hu,
        island_voxels=int(island.sum()),
    )
    return hu_delta, mask, info


def _place_islands(
    spec: HematomaSpec, m: np.ndarray, clot: np.ndarray, grid: ScanGrid, rng: np.random.Generator
) -> np.ndarray:
    """Hypodense island(s) inside the dense clot, with dense clot all around them."""
    h, dz = grid.pixel_spacing, grid.slice_spacing
    dense = m & (clot >= spec.clot_hu - 10.0)
    core = np.zeros_like(dense)
    # At least one pixel (two at fine matrices) of dense clot around the island in-plane.
    for it in (2, 1) if h < 2.5 else (1,):
        core = _z_erode(_inplane_erode(dense, it))
        if core.any():
            break
    if not core.any():
        return core
    dist = ndimage.distance_transform_edt(core, sampling=(dz, h, h))
    top = np.flatnonzero(dist.ravel() >= 0.8 * dist.max())
    centre = np.unravel_index(int(top[rng.integers(top.size)]), core.shape)
    # Round, not shaped by the core: no wider than the room around its centre.
    r_i = max(min(spec.island_rel_radius * spec.radius_eq, float(dist.max())), 1.5 * h)
    kk, rr, cc = np.ogrid[: core.shape[0], : core.shape[1], : core.shape[2]]

    def ball(c, r: float) -> np.ndarray:
        return (((rr - c[1]) * h) ** 2 + ((cc - c[2]) * h) ** 2) / r**2 + ((kk - c[0]) * dz) ** 2 / max(
            r, 0.6 * dz
        ) ** 2 <= 1.0

    island = ball(centre, r_i) & core
    if spec.second_island:
        far = core & ~ndimage.binary_dilation(island, iterations=2)
        far &= ((rr - centre[1]) ** 2 + (cc - centre[2]) ** 2) * h * h > (1.8 * r_i) ** 2
        if far.any():
            cand = np.flatnonzero(far.ravel())
            c2 = np.unravel_index(int(cand[rng.integers(cand.size)]), core.shape)
            island |= ball(c2, 0.7 * r_i) & core
    return island
