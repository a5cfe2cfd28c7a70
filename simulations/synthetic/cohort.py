"""A site's cohort on paper: patients, studies, intended markers, follow-ups, missing labels.

Planning is separate from rendering so that any single study can be re-rendered on its own
(tests compare a re-rendered volume with what was written) and every random draw is keyed by
(seed, site, patient, purpose) rather than by the order in which studies happen to be made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from common.config import LABELS, MARKERS
from simulations.synthetic.phi import PatientIdentity, make_accession, make_identity, make_physician, make_study_time
from simulations.synthetic.profiles import LOCATIONS, SiteProfile

#: Log-odds of expansion at follow-up: a base rate plus each marker's effect (markers predict
#: expansion: that is why they are studied).
EXPANSION_LOGIT: dict[str, float] = {
    "base": -2.2,
    "hypodensity": 0.9,
    "irregular_margin": 0.7,
    "blend_sign": 1.0,
    "fluid_level": 0.8,
}


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

    Markers are independent Bernoulli draws with the site's prevalences; the growth at
    follow-up depends on them through ``EXPANSION_LOGIT``.
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
    for p in range(profile.n_patients):
        ident = make_identity(rng, taken)
        markers = {m: bool(rng.random() < prev) for m, prev in zip(MARKERS, profile.prevalence)}
        location = str(rng.choice(LOCATIONS, p=profile.location_mix))
        has_fu = bool(rng.random() < profile.followup_rate)
        logit = EXPANSION_LOGIT["base"] + sum(EXPANSION_LOGIT[m] for m in MARKERS if markers[m])
        expands = bool(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
        ratio = float(rng.uniform(1.5, 2.4) if expands else rng.uniform(0.8, 1.12))
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
