"""A site's cohort on paper: patients, studies, intended markers, follow-ups, missing labels.

Planning is separate from rendering so that any single study can be re-rendered on its own
(tests compare a re-rendered volume with what was written) and every random draw is keyed by
(seed, site, patient, purpose) rather than by the order in which studies happen to be made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

import numpy as np

from common.config import LABELS, MARKERS
from simulations.synthetic.hematoma import draw_volume_ml
from simulations.synthetic.mimics import draw_mimics, mimic_evidence
from simulations.synthetic.phi import PatientIdentity, make_accession, make_identity, make_physician, make_study_time
from simulations.synthetic.profiles import LOCATIONS, MARKER_PREVALENCE, SiteProfile, default_profiles

#: Odds ratio of hematoma expansion per marker present: pooled estimates of the NCCT-marker
#: meta-analysis (Morotti et al., Neurology 2020): hypodensities 3.47, blend sign 3.49, irregular
#: shape 2.01; it gives none for fluid level, which takes heterogeneous density's 2.74.
EXPANSION_OR: dict[str, float] = {
    "hypodensity": 3.47,
    "irregular_margin": 2.01,
    "blend_sign": 3.49,
    "fluid_level": 2.74,
}
#: Odds ratio per doubling of baseline volume and per hour from onset to the baseline CT (larger
#: and earlier bleeds grow more often, as in the individual-patient meta-analysis of growth; the
#: strengths are design choices), around a 20 ml bleed scanned 3 h after onset.
VOLUME_OR_PER_DOUBLING = 1.5
ONSET_OR_PER_HOUR = 0.85
REFERENCE_VOLUME_ML, REFERENCE_ONSET_H = 20.0, 3.0
#: Onset-to-CT time (h) is log-uniform in this range.
ONSET_RANGE_H: tuple[float, float] = (0.5, 12.0)
#: Share of the default cohort that expands (HE in ~25 % of patients, Eur Stroke J 2025); the
#: logistic model's intercept is solved for it.
EXPANSION_RATE = 0.25
#: Follow-up / baseline volume of a bleed that expands, and of one that does not (the label
#: rule is 1.3 x; the gap keeps the annotator's mask bias from flipping it).
GROWTH_RANGE: dict[bool, tuple[float, float]] = {True: (1.45, 2.4), False: (0.85, 1.15)}


@dataclass(frozen=True)
class PatientDraw:
    """The truth about one patient's bleed at baseline, before any pixel is rendered."""

    markers: Mapping[str, bool]
    severity: Mapping[str, float]  # 0 where the marker is absent
    mimics: Mapping[str, float]  # strength, 0 = absent
    location: str
    volume_ml: float
    onset_hours: float


def draw_patient(
    rng: np.random.Generator,
    prevalence: tuple[float, ...],
    location_mix: tuple[float, ...],
    severity_range: tuple[float, float],
    mimic_scale: float,
) -> PatientDraw:
    """Markers (independent Bernoulli draws), their severities, mimics, location, volume, onset."""
    markers = {m: bool(rng.random() < p) for m, p in zip(MARKERS, prevalence)}
    sev = rng.uniform(*severity_range, size=len(MARKERS))
    severity = {m: max(float(sev[i]), 1e-3) if markers[m] else 0.0 for i, m in enumerate(MARKERS)}
    location = LOCATIONS[min(int(np.searchsorted(np.cumsum(location_mix), rng.random())), len(LOCATIONS) - 1)]
    return PatientDraw(
        markers=markers,
        severity=severity,
        mimics=draw_mimics(rng, mimic_scale),
        location=location,
        volume_ml=draw_volume_ml(rng, location, any(markers.values())),
        onset_hours=float(np.exp(rng.uniform(*np.log(ONSET_RANGE_H)))),
    )


def expansion_logit(markers: Mapping[str, bool], volume_ml: float, onset_hours: float, intercept: float) -> float:
    """Log-odds of expansion: intercept + log OR of each marker present + volume and time terms."""
    return (
        intercept
        + sum(np.log(EXPANSION_OR[m]) for m in MARKERS if markers.get(m))
        + np.log(VOLUME_OR_PER_DOUBLING) * np.log2(volume_ml / REFERENCE_VOLUME_ML)
        + np.log(ONSET_OR_PER_HOUR) * (onset_hours - REFERENCE_ONSET_H)
    )


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


@lru_cache(maxsize=1)
def reference_cohort(n: int = 12_000) -> tuple[PatientDraw, ...]:
    """A large draw of the default pooled cohort (``MARKER_PREVALENCE``, mean location mix,
    default severities and mimic rates): what calibrations solve against."""
    rng = np.random.default_rng(0xC0407)
    loc = tuple(np.mean([p.location_mix for p in default_profiles(12)], axis=0))
    prev = tuple(MARKER_PREVALENCE[m] for m in MARKERS)
    lo_hi = SiteProfile.__dataclass_fields__["severity_range"].default
    return tuple(draw_patient(rng, prev, loc, lo_hi, 1.0) for _ in range(n))


@lru_cache(maxsize=1)
def expansion_intercept() -> float:
    """Intercept at which the reference cohort's mean expansion risk is ``EXPANSION_RATE``."""
    cohort = reference_cohort()
    slopes = np.array([expansion_logit(p.markers, p.volume_ml, p.onset_hours, 0.0) for p in cohort])
    lo, hi = -10.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.mean(_sigmoid(slopes + mid)) < EXPANSION_RATE else (lo, mid)
    return 0.5 * (lo + hi)


def reference_evidence(marker: str) -> np.ndarray:
    """What a reader sees of ``marker`` across the reference cohort (``readers`` calibrates on it)."""
    return np.array(
        [p.severity[marker] if p.markers[marker] else mimic_evidence(p.mimics, marker) for p in reference_cohort()]
    )


@dataclass(frozen=True)
class StudyPlan:
    """One study to render and write; everything needed to reproduce it is in here."""

    seed: int
    site_number: int
    patient_number: int
    patient: PatientIdentity
    study_id: str
    kind: str  # "baseline" or "followup"
    acquired: datetime
    accession: str
    referring_physician: str
    location: str
    markers: Mapping[str, bool]  # the patient's baseline markers (intended)
    growth_ratio: float  # follow-up volume / baseline volume (intended)
    truth: PatientDraw  # severities, mimics, volume, onset
    expansion_risk: float  # true probability of expansion from the logistic model
    expands: bool  # the truth the follow-up renders (when there is one)
    reader_uniforms: tuple[tuple[float, ...], ...]  # reader 1, reader 2, adjudicator x MARKERS
    table_offset: tuple[float, float, float]
    has_scout: bool
    partner_study_id: str | None  # the follow-up of a baseline, or vice versa
    missing_labels: frozenset[str]  # label columns left empty for this study

    @property
    def is_followup(self) -> bool:
        return self.kind == "followup"

    def rng(self, purpose: int) -> np.random.Generator:
        """An independent stream for one purpose of this patient (11 anatomy/hematoma, 2x this
        study's pose and scanner, 3x file names)."""
        return np.random.default_rng([self.seed, self.site_number, self.patient_number, purpose])


@dataclass(frozen=True)
class SitePlan:
    profile: SiteProfile
    studies: tuple[StudyPlan, ...]


def plan_site(profile: SiteProfile, site_number: int, seed: int) -> SitePlan:
    """Draw the site's patients and studies: ids, PHI, markers, location, follow-up, missing cells.

    Markers are independent Bernoulli draws with the site's prevalences (``draw_patient``); the
    growth at follow-up is drawn from the logistic risk model (``expansion_logit``) of the
    markers, baseline volume and onset-to-CT time.
    """
    rng = np.random.default_rng([seed, site_number, 0x517E])
    table = (
        round(float(rng.uniform(-5, 5)), 1),
        round(float(rng.choice([0.0, -120.0, -160.0]) + rng.uniform(-5, 5)), 1),
        round(float(rng.uniform(-300, 100)), 1),
    )
    taken: set[str] = set()
    study_numbers = rng.permutation(np.arange(1, 10000))
    next_study = iter(int(n) for n in study_numbers)
    studies: list[StudyPlan] = []
    intercept = expansion_intercept()
    for p in range(profile.n_patients):
        ident = make_identity(rng, taken)
        truth = draw_patient(rng, profile.prevalence, profile.location_mix, profile.severity_range, profile.mimic_scale)
        markers, location = truth.markers, truth.location
        has_fu = bool(rng.random() < profile.followup_rate)
        risk = float(_sigmoid(expansion_logit(markers, truth.volume_ml, truth.onset_hours, intercept)))
        expands = bool(rng.random() < risk)
        ratio = float(rng.uniform(*GROWTH_RANGE[expands]))
        uniforms = tuple(tuple(float(u) for u in row) for row in rng.random((3, len(MARKERS))))
        when = make_study_time(rng)
        base_id = f"ST{next(next_study):04d}"
        fu_id = f"ST{next(next_study):04d}" if has_fu else None
        missing = frozenset(l for l in LABELS if rng.random() < profile.missing_label_rate)
        common = dict(
            seed=seed,
            site_number=site_number,
            patient_number=p,
            patient=ident,
            location=location,
            markers=markers,
            table_offset=table,
            truth=truth,
            expansion_risk=risk,
            expands=expands,
            reader_uniforms=uniforms,
        )
        studies.append(
            StudyPlan(
                **common,
                study_id=base_id,
                kind="baseline",
                acquired=when,
                accession=make_accession(rng, site_number, when),
                referring_physician=make_physician(rng),
                growth_ratio=1.0,
                has_scout=bool(rng.random() < profile.scout_rate),
                partner_study_id=fu_id,
                missing_labels=missing,
            )
        )
        if has_fu:
            fu_when = when + timedelta(hours=float(rng.uniform(6.0, 36.0)))
            studies.append(
                StudyPlan(
                    **common,
                    study_id=fu_id,
                    kind="followup",
                    acquired=fu_when,
                    accession=make_accession(rng, site_number, fu_when),
                    referring_physician=make_physician(rng),
                    growth_ratio=ratio,
                    has_scout=bool(rng.random() < profile.scout_rate),
                    partner_study_id=base_id,
                    missing_labels=frozenset(),
                )
            )
    return SitePlan(profile=profile, studies=tuple(studies))
