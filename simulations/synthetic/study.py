"""Render one planned study: patient anatomy, hematoma, scanner, annotator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from simulations.synthetic.anatomy import HeadPose, ScanGrid, make_head, sample_anatomy
from simulations.synthetic.cohort import StudyPlan
from simulations.synthetic.hematoma import grow_hematoma, make_hematoma, sample_hematoma_spec
from simulations.synthetic.mimics import partial_volume, partial_volume_weight, render_mimics
from simulations.synthetic.profiles import SiteProfile
from simulations.synthetic.scanner import apply_scanner, fov_outside

#: Head-frame z range (mm) a routine head CT covers: skull base to vertex.
Z_COVERAGE_MM: tuple[float, float] = (-45.0, 90.0)


@dataclass(frozen=True)
class RenderedStudy:
    """A study as the scanner and the annotator produced it.

    ``hu``: float32 [k, r, c] as stored (before quantisation to the site's stored values);
    ``mask``: the site annotator's mask (bool, same grid); ``true_mask``: the hematoma itself;
    ``outside_fov``: (R, C) pixels outside the reconstruction circle (written as padding).
    """

    plan: StudyPlan
    grid: ScanGrid
    pose: HeadPose
    hu: np.ndarray
    mask: np.ndarray
    true_mask: np.ndarray
    outside_fov: np.ndarray
    info: dict[str, Any]


def sample_grid_pose(
    rng: np.random.Generator, profile: SiteProfile, table_offset: tuple[float, float, float]
) -> tuple[ScanGrid, HeadPose]:
    """The scan grid (site protocol, table position) and where the head lies on it.

    Spacings and the origin are rounded to what the DICOM header will say, so the header, the
    mask affine and the rendered volume describe exactly the same grid.
    """
    n = profile.matrix
    ps = round(profile.fov_mm / n, 6)
    dz = profile.slice_spacing_mm
    k = int(round((Z_COVERAGE_MM[1] - Z_COVERAGE_MM[0]) / dz)) + 1
    tx, ty, tz = table_offset
    x0 = round(tx - (n - 1) / 2.0 * ps, 4)
    y0 = round(ty - (n - 1) / 2.0 * ps, 4)
    z0 = round(tz + float(rng.uniform(-20.0, 20.0)), 2)
    grid = ScanGrid(shape=(k, n, n), pixel_spacing=ps, slice_spacing=dz, origin=(x0, y0, z0))
    sx, sy = profile.head_shift_mm
    cx, cy = grid.centre_xy
    shift = rng.normal(0.0, profile.head_shift_sd_mm, size=2).clip(-12.0, 12.0)
    centre = (
        cx + sx + float(shift[0]),
        cy + sy + float(shift[1]),
        z0 - Z_COVERAGE_MM[0] + float(rng.uniform(-4.0, 4.0)),
    )
    tilt = float(np.clip(profile.tilt_deg + rng.normal(0.0, profile.tilt_sd_deg), -25.0, 25.0))
    return grid, HeadPose(centre=centre, tilt_deg=tilt)


def annotate_mask(mask: np.ndarray, bias_px: int) -> np.ndarray:
    """The site annotator's habit: masks drawn ``bias_px`` pixels too wide (+) or tight (-).

    Works slice by slice (annotators draw in-plane); an erosion never erases a whole slice's
    hematoma, since an annotator who sees blood draws something.
    """
    if bias_px == 0:
        return mask.copy()
    st = np.zeros((1, 3, 3), dtype=bool)
    st[0] = ndimage.generate_binary_structure(2, 1)
    if bias_px > 0:
        return ndimage.binary_dilation(mask, st, iterations=bias_px)
    eroded = ndimage.binary_erosion(mask, st, iterations=-bias_px, border_value=0)
    keep = eroded.any(axis=(1, 2))
    eroded[~keep] = mask[~keep]
    return eroded


def render_study(profile: SiteProfile, plan: StudyPlan) -> RenderedStudy:
    """Render a planned study deterministically (same plan -> same arrays, bit for bit)."""
    rng_patient = plan.rng(11)
    anat = sample_anatomy(rng_patient)
    t = plan.truth
    spec = sample_hematoma_spec(rng_patient, plan.location, plan.markers, anat, t.severity, t.volume_ml, t.mimics)
    rng = plan.rng(21 if not plan.is_followup else 22)
    if plan.is_followup:
        spec = grow_hematoma(spec, plan.growth_ratio, rng)
    grid, pose = sample_grid_pose(rng, profile, plan.table_offset)
    head = make_head(anat, grid, pose)
    delta, true_mask, info = make_hematoma(spec, grid, pose, head, rng)
    delta += render_mimics(head.hu + delta, head, grid, pose, spec.centre, spec.radius_eq, t.mimics, plan.rng(12))
    delta = partial_volume(delta, partial_volume_weight(profile.slice_thickness_mm))
    hu = apply_scanner(head.hu + delta, head, grid, pose, profile, rng)
    outside = fov_outside(grid, profile.fov_mm) if profile.fov_circle else np.zeros(grid.shape[1:], dtype=bool)
    mask = annotate_mask(true_mask, profile.annotator_bias_px)
    mask[:, outside] = False
    info["severity"] = {m: (t.severity[m] if on else 0.0) for m, on in info["markers"].items()}
    info = dict(info, atrophy=anat.atrophy, tilt_deg=pose.tilt_deg, annotated_ml=float(mask.sum() * grid.voxel_ml))
    return RenderedStudy(
        plan=plan, grid=grid, pose=pose, hu=hu, mask=mask, true_mask=true_mask, outside_fov=outside, info=info
    )
