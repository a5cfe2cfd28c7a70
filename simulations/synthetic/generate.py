"""Generate a whole synthetic multi-site dataset: ``DATA_ROOT/site-NN/`` in the data contract."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import LABELS, MARKERS
from simulations.parallel import run_jobs
from simulations.synthetic.cohort import StudyPlan, plan_site
from simulations.synthetic.mimics import MIMICS, mimic_evidence
from simulations.synthetic.montage import (
    COLUMNS,
    DifficultyTiles,
    Tile,
    make_tile,
    offer_difficulty_tiles,
    save_difficulty_montage,
    save_montage,
)
from simulations.synthetic.profiles import DEFAULT_STUDIES_SCALE, SiteProfile, default_profiles, scale_studies
from simulations.synthetic.readers import (
    adjudicate,
    label_probability,
    reader_calls,
    reader_params,
    study_evidence,
)
from simulations.synthetic.study import RenderedStudy, render_study
from simulations.synthetic.truth import TRUTH_DIR, truth_path, write_truth
from simulations.synthetic.writers import mask_affine, write_dicom_study, write_labels, write_mask, write_site_toml

#: Follow-up volume / baseline volume at or above which a hematoma has expanded (docs/design.md §1).
EXPANSION_RATIO = 1.3
_TOP_LEVEL_FILES = ("montage.png", "montage-difficulty.png", "README.txt", "dataset.json", TRUTH_DIR)
#: Default reference matrix: the default experiment's model reads 64x64 slices, and 96 keeps a
#: 12-site dataset of ~1,500 studies quick to write (sites use 72, 96 and 120).
DEFAULT_MATRIX = 96


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


def read_markers(profile: SiteProfile, plan: StudyPlan, realised: dict[str, bool], severity: dict[str, float]) -> dict:
    """The site's reader(s) look at a baseline: per marker the evidence, the probability that the
    label is 1 given it, each reader's call and the label (one reader's call, or two readers' calls
    adjudicated); see ``readers``."""
    out: dict[str, Any] = {}
    uniforms = np.asarray(plan.reader_uniforms)  # reader 1, reader 2, adjudicator x MARKERS
    for i, m in enumerate(MARKERS):
        thr, tau = reader_params(m, profile.reader_noise, profile.reader_tendency)
        e = study_evidence(realised[m], severity[m], mimic_evidence(plan.truth.mimics, m), profile.reader_noise)
        calls = reader_calls(np.full(len(uniforms), e), uniforms[:, i], thr, tau)
        label = adjudicate(list(calls[: profile.readers]), calls[2])
        out[m] = {
            "evidence": e,
            "label_probability": float(label_probability(np.float64(e), thr, tau, profile.readers)),
            "reader1": int(calls[0]),
            "reader2": int(calls[1]) if profile.readers == 2 else None,
            "label": int(label),
        }
    return out


def _truth_row(profile: SiteProfile, st: StudyPlan, r: RenderedStudy, reads: dict | None) -> dict[str, Any]:
    """The ground truth of one study (written outside the site folders; ``truth``)."""
    row: dict[str, Any] = {
        "site_id": profile.site_id,
        "patient_id": st.patient.patient_id,
        "study_id": st.study_id,
        "kind": st.kind,
        "location": st.location,
        "true_volume_ml": round(r.info["volume_ml"], 3),
        "onset_hours": round(st.truth.onset_hours, 3),
        "expansion_risk": round(st.expansion_risk, 5),
        "growth_ratio": round(st.growth_ratio if st.is_followup else 1.0, 4),
    }
    for k in MIMICS:
        row[f"mimic_{k}"] = round(st.truth.mimics[k], 3)
    if reads is not None:
        for m in MARKERS:
            row[f"{m}_true"] = int(r.info["markers"][m])
            row[f"{m}_severity"] = round(r.info["severity"][m], 4)
            for key in ("evidence", "label_probability", "reader1", "reader2", "label"):
                v = reads[m][key]
                row[f"{m}_{key}"] = "" if v is None else (round(v, 6) if isinstance(v, float) else v)
    return row


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
    truth_rows: list[dict[str, Any]] | None = None,
    difficulty: DifficultyTiles | None = None,
) -> SiteSummary:
    """Render and write one site folder; ``tiles`` / ``difficulty`` collect montage examples and
    ``truth_rows`` the ground truth of every study, when given."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    plan = plan_site(profile, site_number, seed)
    site_dir.mkdir(parents=True, exist_ok=True)
    write_site_toml(site_dir / "site.toml", profile)
    rows: dict[str, dict[str, Any]] = {}
    volumes: dict[str, tuple[float, float]] = {}  # annotated and true mask volume of each baseline
    truth: dict[str, dict[str, Any]] = {}
    n_files = 0
    for st in tqdm(plan.studies, desc=profile.site_id, unit="study", disable=not progress):
        r = render_study(profile, st)
        pid = st.patient.patient_id
        n_files += write_dicom_study(site_dir / "dicom" / pid / st.study_id, profile, r)
        write_mask(site_dir / "masks" / pid / f"{st.study_id}.nii.gz", r.mask, r.grid, profile.mask_layout)
        n_files += 1
        volume = mask_volume_ml(r.mask, mask_affine(r.grid, profile.mask_layout)[2])
        row: dict[str, Any] = {"patient_id": pid, "study_id": st.study_id, "location": st.location}
        reads = None if st.is_followup else read_markers(profile, st, r.info["markers"], r.info["severity"])
        truth[st.study_id] = _truth_row(profile, st, r, reads)
        if st.is_followup:
            base = rows[st.partner_study_id]
            v0, t0_ml = volumes[st.partner_study_id]
            base["expansion"] = _label(volume >= EXPANSION_RATIO * v0, "expansion", base["_missing"])
            truth[st.partner_study_id]["expansion_label"] = "" if base["expansion"] is None else base["expansion"]
            truth[st.partner_study_id]["expansion_true"] = int(r.info["volume_ml"] >= EXPANSION_RATIO * t0_ml)
        else:
            for m in MARKERS:
                row[m] = _label(reads[m]["label"], m, st.missing_labels)
            row["followup_study_id"] = st.partner_study_id
            row["_missing"] = st.missing_labels
            volumes[st.study_id] = (volume, r.info["volume_ml"])
            if tiles is not None:
                _offer_tile(tiles, r)
            if difficulty is not None:
                offer_difficulty_tiles(difficulty, r, {m: reads[m]["evidence"] for m in MARKERS}, profile.site_id)
        rows[st.study_id] = row
    ordered = sorted(rows.values(), key=lambda r_: (r_["patient_id"], r_["study_id"]))
    write_labels(site_dir / "labels.csv", ordered)
    if truth_rows is not None:
        truth_rows.extend(truth[r_["study_id"]] for r_ in ordered)
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


def _site_job(
    args: tuple[Path, SiteProfile, int, int],
) -> tuple[SiteSummary, dict[str, Tile], DifficultyTiles, list[dict[str, Any]]]:
    """One site in a worker process: its summary, montage tiles and truth rows."""
    site_dir, profile, number, seed = args
    tiles: dict[str, Tile] = {}
    difficulty: DifficultyTiles = {}
    truth_rows: list[dict[str, Any]] = []
    summary = generate_site(site_dir, profile, number, seed, False, tiles, truth_rows, difficulty)
    return summary, tiles, difficulty, truth_rows


def _run_sites(jobs: list[tuple[Path, SiteProfile, int, int]], workers: int, progress: bool) -> list[tuple]:
    """Run the site jobs, largest first, in ``workers`` processes; results in job order.

    Every site's draws are keyed by (seed, site number), so the order and the number of workers
    change nothing in the output.
    """

    def done(i: int, result: tuple) -> None:
        if progress:
            print(f"  {jobs[i][1].site_id}: {result[0].studies} studies", flush=True)

    return run_jobs(_site_job, jobs, workers, [job[1].n_patients for job in jobs], done)


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
    matrix: int = DEFAULT_MATRIX,
    studies_scale: float = DEFAULT_STUDIES_SCALE,
    progress: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
    profile_overrides: Mapping[str, Any] | None = None,
) -> GenerationSummary:
    """Write ``n_sites`` synthetic hospitals under ``out`` plus montage.png, montage-difficulty.png,
    README.txt, dataset.json and the ground truth ``.truth/truth.csv`` (outside every site folder:
    training never reads it; ``simulations.synthetic.ceiling`` does). The same arguments give the
    same pixels, masks, labels, truth and UIDs, whatever ``workers``.

    ``matrix`` is the reference image size (sites use 0.75x, 1x or 1.25x of it);
    ``studies_scale`` scales every site's patient count (at least two patients per site);
    ``workers`` processes write sites in parallel (default: one per CPU core, at most one per site).
    ``profile_overrides`` sets ``SiteProfile`` fields on every site, e.g. ``{"reader_noise": 0}``
    (labels = truth), ``{"mimic_scale": 0}``, ``{"readers": 2}`` (docs/synthetic-data.md).
    ``overwrite`` replaces site folders left by an earlier run instead of refusing.
    """
    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out, overwrite)
    profiles = [
        replace(scale_studies(p, studies_scale), **dict(profile_overrides or {}))
        for p in default_profiles(n_sites, seed, matrix)
    ]
    workers = min(n_sites, os.cpu_count() or 1) if workers is None else workers
    jobs = [(out / p.site_id, p, i, seed) for i, p in enumerate(profiles, start=1)]
    results = _run_sites(jobs, workers, progress)
    summaries = [r[0] for r in results]
    tiles = {p.site_id: r[1] for p, r in zip(profiles, results)}
    labels = {
        p.site_id: f"{p.site_id}\n{p.manufacturer.split()[0]} {p.kernel}\nsd {p.noise_sigma_hu:.0f} HU, {p.matrix}px"
        for p in profiles
    }
    save_montage(out / "montage.png", tiles, labels)
    save_difficulty_montage(out / "montage-difficulty.png", [r[2] for r in results])
    write_truth(truth_path(out), [row for r in results for row in r[3]])
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
        "workers_do_not_change_output": True,
        "expansion_rule": f"follow-up mask volume >= {EXPANSION_RATIO} x baseline mask volume",
        "labels": "reader calls (simulations.synthetic.readers), not the truth",
        "truth": str(truth_path(out).relative_to(out)),
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
        "Markers have a severity from subtle to obvious: hypodensity = enclosed island(s) 15-45 HU",
        "below the clot median; irregular_margin = 1-4 lobules, shallow to deep; blend_sign = a",
        "18-40 HU darker cap reaching the border, blurred to sharp boundary; fluid_level = serum",
        "12-40 HU over cells, level perpendicular to gravity (+y, posterior = larger row index).",
        "Mimics (edema, slight lobulation, streaks, intraventricular blood, calcification, small",
        "second bleeds) appear in positives and negatives. Marker labels are a reader's call, not",
        "the truth; the truth is in .truth/truth.csv (never inside a site folder). See",
        "docs/synthetic-data.md.",
        "",
    ]
    head = (
        f"{'site':8} {'vendor':10} {'kernel':8} {'noise':>5} {'off':>5} {'mtx':>4} "
        f"{'ps':>5} {'dz':>4} {'cup':>4} {'strk':>4} {'tilt':>5} {'pix':>9} {'slope':>5} "
        f"{'pad':>6} {'order':10} {'ext':4} {'mask':8} {'bias':>4} {'miss':>4} "
        f"{'window':>10} {'mim':>4} {'tend':>5} {'studies':>7} {'fu':>3} {'hyp':>3} {'irr':>3} {'bld':>3} "
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
            f"{f'[{p.window[0]:g},{p.window[1]:g}]':>10} {p.mimic_scale:4.2f} {p.reader_tendency:+5.2f} "
            f"{s.studies:7d} {s.followups:3d} "
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
        "erosion (-) in pixels; miss = share of label cells left empty; mim = mimic rate",
        "multiplier; tend = reader threshold shift (+ strict, - lenient); hyp..exp = positive",
        "labels written (reader calls).",
        "",
    ]
    return "\n".join(lines)
