"""Generate a whole synthetic multi-site dataset: ``DATA_ROOT/site-NN/`` in the data contract."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import LABELS, MARKERS
from simulations.synthetic.cohort import plan_site
from simulations.synthetic.montage import COLUMNS, Tile, make_tile, save_montage
from simulations.synthetic.profiles import SiteProfile, default_profiles, scale_studies
from simulations.synthetic.study import RenderedStudy, render_study
from simulations.synthetic.writers import mask_affine, write_dicom_study, write_labels, write_mask, write_site_toml

#: Follow-up volume / baseline volume at or above which a hematoma has expanded (docs/design.md §1).
EXPANSION_RATIO = 1.3
_TOP_LEVEL_FILES = ("montage.png", "README.txt", "dataset.json")


@dataclass(frozen=True)
class SiteSummary:
    """What one site folder holds."""

    site_id: str
    studies: int
    patients: int
    followups: int
    positives: dict[str, int]
    files: int
    elapsed_s: float


@dataclass(frozen=True)
class GenerationSummary:
    """What ``generate_dataset`` wrote, per site and in total."""

    out: Path
    seed: int
    matrix: int
    sites: tuple[SiteSummary, ...]
    elapsed_s: float

    @property
    def studies(self) -> int:
        return sum(s.studies for s in self.sites)

    @property
    def files(self) -> int:
        return sum(s.files for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    def describe(self) -> str:
        """A few lines for the command line: totals, then one line per site."""
        lines = [
            f"wrote {len(self.sites)} sites to {self.out}: {self.studies} studies, "
            f"{self.files} files in {self.elapsed_s:.1f} s (seed {self.seed}, matrix "
            f"{self.matrix})"
        ]
        for s in self.sites:
            pos = " ".join(f"{k}={v}" for k, v in s.positives.items())
            lines.append(
                f"  {s.site_id}: {s.studies:3d} studies, {s.patients:3d} patients, "
                f"{s.followups:2d} follow-ups; positives {pos}"
            )
        return "\n".join(lines)


def mask_volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """Mask volume from its voxel count and the voxel size its affine implies."""
    return float(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def _label(value: bool, name: str, missing: frozenset[str]) -> int | None:
    return None if name in missing else int(bool(value))


def _offer_tile(tiles: dict[str, Tile], r: RenderedStudy) -> None:
    """Keep the best example of each marker (a pure one beats one with other markers)."""
    realised = r.info["markers"]
    n_pos = sum(realised.values())
    ps = r.grid.pixel_spacing
    rad = r.info.get("radius_eq_mm", 10.0)
    cap = f"{r.plan.location} {r.info['volume_ml']:.0f} ml"
    if n_pos == 0:
        if "negative" not in tiles:
            tiles["negative"] = make_tile(r.hu, r.mask, r.info["slices"]["largest"], ps, rad, cap, 0, crop=False)
        return
    for m in MARKERS:
        purity = 2 if n_pos == 1 else 1
        if realised[m] and (m not in tiles or tiles[m].purity < purity):
            tiles[m] = make_tile(r.hu, r.mask, r.info["slices"][m], ps, rad, cap, purity, crop=True)


def generate_site(
    site_dir: Path,
    profile: SiteProfile,
    site_number: int,
    seed: int,
    progress: bool = True,
    tiles: dict[str, Tile] | None = None,
) -> SiteSummary:
    """Render and write one site folder; ``tiles`` collects montage examples when given."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    plan = plan_site(profile, site_number, seed)
    site_dir.mkdir(parents=True, exist_ok=True)
    write_site_toml(site_dir / "site.toml", profile)
    rows: dict[str, dict[str, Any]] = {}
    base_volume: dict[str, float] = {}
    n_files = 0
    for st in tqdm(plan.studies, desc=profile.site_id, unit="study", disable=not progress):
        r = render_study(profile, st)
        pid = st.patient.patient_id
        n_files += write_dicom_study(site_dir / "dicom" / pid / st.study_id, profile, r)
        write_mask(site_dir / "masks" / pid / f"{st.study_id}.nii.gz", r.mask, r.grid, profile.mask_layout)
        n_files += 1
        volume = mask_volume_ml(r.mask, mask_affine(r.grid, profile.mask_layout)[2])
        row: dict[str, Any] = {"patient_id": pid, "study_id": st.study_id, "location": st.location}
        if st.is_followup:
            base = rows[st.partner_study_id]
            expanded = volume >= EXPANSION_RATIO * base_volume[st.partner_study_id]
            base["expansion"] = _label(expanded, "expansion", base["_missing"])
        else:
            for m in MARKERS:
                row[m] = _label(r.info["markers"][m], m, st.missing_labels)
            row["followup_study_id"] = st.partner_study_id
            row["_missing"] = st.missing_labels
            base_volume[st.study_id] = volume
            if tiles is not None:
                _offer_tile(tiles, r)
        rows[st.study_id] = row
    ordered = sorted(rows.values(), key=lambda r_: (r_["patient_id"], r_["study_id"]))
    write_labels(site_dir / "labels.csv", ordered)
    positives = {lab: sum(1 for r_ in ordered if r_.get(lab) == 1) for lab in LABELS}
    n_fu = sum(1 for s in plan.studies if s.is_followup)
    return SiteSummary(
        site_id=profile.site_id,
        studies=len(plan.studies),
        patients=len(plan.studies) - n_fu,
        followups=n_fu,
        positives=positives,
        files=n_files,
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def _prepare_out(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("site-*")) + [out / f for f in _TOP_LEVEL_FILES if (out / f).exists()]
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds a generated dataset ({stale[0].name}, ...); pass overwrite=True to replace it"
        )
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def generate_dataset(
    out: Path,
    n_sites: int = 12,
    seed: int = 0,
    matrix: int = 128,
    studies_scale: float = 1.0,
    progress: bool = True,
    overwrite: bool = False,
) -> GenerationSummary:
    """Write ``n_sites`` synthetic hospitals under ``out`` plus montage.png, README.txt and
    dataset.json; the same arguments give the same pixels, masks, labels and UIDs.

    ``matrix`` is the reference image size (sites use 0.75x, 1x or 1.25x of it);
    ``studies_scale`` scales every site's patient count (at least two patients per site).
    ``overwrite`` replaces site folders left by an earlier run instead of refusing.
    """
    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out, overwrite)
    profiles = [scale_studies(p, studies_scale) for p in default_profiles(n_sites, seed, matrix)]
    tiles: dict[str, dict[str, Tile]] = {}
    summaries = []
    for i, prof in enumerate(profiles, start=1):
        tiles[prof.site_id] = {}
        summaries.append(generate_site(out / prof.site_id, prof, i, seed, progress, tiles[prof.site_id]))
    labels = {
        p.site_id: f"{p.site_id}\n{p.manufacturer.split()[0]} {p.kernel}\nsd {p.noise_sigma_hu:.0f} HU, {p.matrix}px"
        for p in profiles
    }
    save_montage(out / "montage.png", tiles, labels)
    summary = GenerationSummary(
        out=out, seed=seed, matrix=matrix, sites=tuple(summaries), elapsed_s=round(time.perf_counter() - t0, 3)
    )
    write_dataset_description(out, profiles, summary, studies_scale)
    return summary


def write_dataset_description(
    out: Path, profiles: list[SiteProfile], summary: GenerationSummary, studies_scale: float
) -> None:
    """dataset.json (machine-readable profiles and counts) and README.txt (the same for people)."""
    doc = {
        "generator": "simulations.synthetic",
        "format": "hemexp site data contract v1",
        "seed": summary.seed,
        "matrix": summary.matrix,
        "studies_scale": studies_scale,
        "expansion_rule": f"follow-up mask volume >= {EXPANSION_RATIO} x baseline mask volume",
        "columns": list(COLUMNS),
        "sites": [dict(profile=asdict(p), summary=asdict(s)) for p, s in zip(profiles, summary.sites)],
        "elapsed_s": summary.elapsed_s,
    }
    (out / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "README.txt").write_text(describe(profiles, summary))


def describe(profiles: list[SiteProfile], summary: GenerationSummary) -> str:
    """A plain-text description of the dataset and a table of the site profiles."""
    lines = [
        "hemexp synthetic multi-site head CT dataset",
        "=" * 44,
        "",
        f"seed {summary.seed}, reference matrix {summary.matrix}, {len(profiles)} sites, "
        f"{summary.studies} studies, {summary.files} files.",
        "Every study is an acute intracerebral hemorrhage on non-contrast CT; all data are",
        "synthetic (names, IDs and dates in the DICOM headers are fake PHI for testing).",
        "",
        "Layout per site (docs/design.md §4): site.toml, labels.csv,",
        "dicom/<patient_id>/<study_id>/<random names> (one axial series; some studies also hold",
        "a LOCALIZER image in another series), masks/<patient_id>/<study_id>.nii.gz (uint8 0/1;",
        "the axis order differs between sites, the RAS affine is always right).",
        "labels.csv: 1 / 0 / empty = not annotated; expansion only on baselines with a",
        f"follow-up (follow-up mask volume >= {EXPANSION_RATIO} x baseline); follow-up rows have",
        "no labels. Extra columns: location, followup_study_id.",
        "",
        "Markers: hypodensity = enclosed island(s) >= 30 HU below the clot median;",
        "irregular_margin = 2-4 lobules; blend_sign = a 22-34 HU darker cap reaching the border,",
        "sharp boundary; fluid_level = serum over cells, level perpendicular to gravity (+y,",
        "posterior = larger row index).",
        "",
    ]
    head = (
        f"{'site':8} {'vendor':10} {'kernel':8} {'noise':>5} {'off':>5} {'mtx':>4} "
        f"{'ps':>5} {'dz':>4} {'cup':>4} {'strk':>4} {'tilt':>5} {'pix':>9} {'slope':>5} "
        f"{'pad':>6} {'order':10} {'ext':4} {'mask':8} {'bias':>4} {'miss':>4} "
        f"{'window':>10} {'studies':>7} {'fu':>3} {'hyp':>3} {'irr':>3} {'bld':>3} "
        f"{'flu':>3} {'exp':>3}"
    )
    lines += [head, "-" * len(head)]
    for p, s in zip(profiles, summary.sites):
        pix = ("signed" if p.pixel_representation else "unsigned") + f"{p.rescale_intercept:+.0f}"
        pos = s.positives
        lines.append(
            f"{p.site_id:8} {p.manufacturer.split()[0][:10]:10} {p.kernel:8} "
            f"{p.noise_sigma_hu:5.1f} {p.hu_offset:+5.1f} {p.matrix:4d} {p.pixel_spacing_mm:5.2f} "
            f"{p.slice_spacing_mm:4.1f} {p.cupping_hu:4.1f} {p.streak_hu:4.0f} "
            f"{p.tilt_deg:+5.0f} {pix:>9} {p.rescale_slope:5.2f} "
            f"{'-' if p.pixel_padding_value is None else p.pixel_padding_value:>6} "
            f"{p.instance_order:10} {p.file_extension or '-':4} {p.mask_layout:8} "
            f"{p.annotator_bias_px:+4d} {p.missing_label_rate:4.2f} "
            f"{f'[{p.window[0]:g},{p.window[1]:g}]':>10} {s.studies:7d} {s.followups:3d} "
            f"{pos['hypodensity']:3d} {pos['irregular_margin']:3d} {pos['blend_sign']:3d} "
            f"{pos['fluid_level']:3d} {pos['expansion']:3d}"
        )
    lines += [
        "",
        "Columns: noise = quantum noise SD after the kernel (HU); off = HU calibration",
        "offset; mtx/ps = matrix and pixel size (mm); dz = slice spacing (mm); cup/strk =",
        "beam-hardening cupping and posterior-fossa streak strength (HU); tilt = mean head",
        "rotation (deg); pix = PixelRepresentation and RescaleIntercept; pad =",
        "PixelPaddingValue; order = InstanceNumber order; ext = file extension;",
        "mask = stored axis order of the NIfTI masks; bias = annotator dilation (+) /",
        "erosion (-) in pixels; miss = share of label cells left empty; hyp..exp =",
        "positive labels written.",
        "",
    ]
    return "\n".join(lines)
