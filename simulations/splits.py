"""From a dataset to the sites of a simulation: natural sites, or virtual sites cut from the pool.

Every split works on whole patients (a patient's studies stay together, so the patient-wise
train/test split inside each site stays patient-disjoint), and returns :class:`SitePlan` s: which
studies of which source cache make up each site, and how its scanner differs (``AcquisitionShift``).
``simulations.virtual`` writes a plan as an ordinary site cache. All draws are seeded.

- ``natural``: one site per site folder, as collected.
- ``site-column``: the pooled data's ``site`` column of labels.csv (cache field ``group``).
- ``iid``: patients dealt to ``n`` sites at random (the no-shift reference).
- ``dirichlet``: label skew: each patient class is spread over the sites by proportions drawn
  from Dirichlet(alpha); small alpha = each site sees mostly some classes.
- ``quantity``: site sizes drawn from Dirichlet(alpha); labels as in the pool.
- scanner shift (any split, ``shift`` in 0..1): each site gets its own noise, blur, HU offset and
  resolution loss, scaled by the severity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.data.cache import SiteCache
from common.config import MARKERS

#: Every virtual site gets at least this many patients (one for test, the rest for training).
MIN_PATIENTS_PER_SITE = 3


@dataclass(frozen=True)
class AcquisitionShift:
    """A virtual scanner: added noise (HU sd), Gaussian blur (pixels), HU offset, resolution factor."""

    noise_hu: float = 0.0
    blur_px: float = 0.0
    offset_hu: float = 0.0
    resolution: float = 1.0  # 1 = native; 0.5 = half the pixels along each axis, then back up

    @property
    def is_identity(self) -> bool:
        return self.noise_hu == 0 and self.blur_px == 0 and self.offset_hu == 0 and self.resolution == 1.0

    def describe(self) -> str:
        return (
            f"noise {self.noise_hu:.1f} HU, blur {self.blur_px:.2f} px, offset {self.offset_hu:+.1f} HU, "
            f"resolution x{self.resolution:.2f}"
        )


@dataclass(frozen=True)
class SitePlan:
    """One site of a simulation: ``(source, study)`` index pairs into the source caches."""

    site_id: str
    studies: tuple[tuple[int, int], ...]
    shift: AcquisitionShift = AcquisitionShift()
    fault: Mapping[str, Any] = field(default_factory=dict)

    def digest(self, sources: Sequence[SiteCache]) -> str:
        """What identifies the plan's cache: source cache keys, studies and shift."""
        h = hashlib.sha256(
            repr(
                (
                    self.site_id,
                    [sources[s].index["key"] for s in sorted({s for s, _ in self.studies})],
                    self.studies,
                    self.shift,
                )
            ).encode()
        )
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Patient:
    key: tuple[int, str]  # (source index, patient pseudonym)
    studies: tuple[tuple[int, int], ...]
    label_class: str  # first positive marker, "none", or "unlabelled"


def patient_class(labels: Sequence[float | None]) -> str:
    """The class label skew acts on: the first positive marker, else "none" (or "unlabelled")."""
    markers = [labels[i] for i in range(len(MARKERS))]
    if all(v is None for v in markers):
        return "unlabelled"
    for name, v in zip(MARKERS, markers):
        if v is not None and v > 0:
            return name
    return "none"


def pool_patients(sources: Sequence[SiteCache]) -> list[Patient]:
    """Every patient of every source, studies kept together, in a fixed order: by source, then by
    ``patient_order`` (not by pseudonym, whose random key would deal other patients on every copy)."""
    grouped: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for s, cache in enumerate(sources):
        for i, study in enumerate(cache.studies):
            grouped.setdefault((s, study["patient"]), []).append((s, i))
    ordered = sorted(
        grouped.items(), key=lambda kv: (kv[0][0], sources[kv[0][0]].studies[kv[1][0][1]]["patient_order"])
    )
    return [
        Patient(key, tuple(st), patient_class(sources[st[0][0]].studies[st[0][1]]["labels"])) for key, st in ordered
    ]


def natural_plans(sources: Sequence[SiteCache]) -> list[SitePlan]:
    return [SitePlan(c.index["site_id"], tuple((s, i) for i in range(len(c.studies)))) for s, c in enumerate(sources)]


def site_column_plans(sources: Sequence[SiteCache]) -> tuple[list[SitePlan], list[str]]:
    """Sites named by the ``site`` column; returns the plans and one problem line per source
    whose studies lack the column (those studies are left out, and said so)."""
    groups: dict[str, list[tuple[int, int]]] = {}
    problems = []
    for s, cache in enumerate(sources):
        missing = 0
        for i, study in enumerate(cache.studies):
            if study.get("group"):
                groups.setdefault(study["group"], []).append((s, i))
            else:
                missing += 1
        if missing:
            problems.append(
                f"{cache.index['site_id']}: {missing} stud{'y' if missing == 1 else 'ies'} without a value "
                "in labels.csv's site column; left out of the site-column split"
            )
    if not groups:
        raise ValueError("split 'site-column': no study has a value in labels.csv's 'site' column")
    return [SitePlan(name, tuple(st)) for name, st in sorted(groups.items())], problems


def _deal(patients: Sequence[Patient], owner: np.ndarray, n_sites: int) -> list[SitePlan]:
    """Plans from a site index per patient, after topping up sites below ``MIN_PATIENTS_PER_SITE``
    with patients from the largest site (so that every site can train and test)."""
    owner = owner.copy()
    if len(patients) < n_sites * MIN_PATIENTS_PER_SITE:
        raise ValueError(f"{len(patients)} patients cannot make {n_sites} sites of at least {MIN_PATIENTS_PER_SITE}")
    for site in range(n_sites):
        while (owner == site).sum() < MIN_PATIENTS_PER_SITE:
            donor = int(np.argmax(np.bincount(owner, minlength=n_sites)))
            owner[np.flatnonzero(owner == donor)[-1]] = site
    width = len(str(n_sites))
    return [
        SitePlan(f"virtual-{k + 1:0{width}d}", tuple(st for p, o in zip(patients, owner) if o == k for st in p.studies))
        for k in range(n_sites)
    ]


def iid_plans(sources: Sequence[SiteCache], n_sites: int, seed: int) -> list[SitePlan]:
    patients = pool_patients(sources)
    rng = np.random.default_rng(seed)
    owner = np.empty(len(patients), dtype=int)
    owner[rng.permutation(len(patients))] = np.arange(len(patients)) % n_sites
    return _deal(patients, owner, n_sites)


def dirichlet_plans(sources: Sequence[SiteCache], n_sites: int, alpha: float, seed: int) -> list[SitePlan]:
    """Label skew: each class's patients go to the sites by proportions ~ Dirichlet(alpha)."""
    patients = pool_patients(sources)
    rng = np.random.default_rng(seed)
    owner = np.empty(len(patients), dtype=int)
    for cls in sorted({p.label_class for p in patients}):
        members = rng.permutation([i for i, p in enumerate(patients) if p.label_class == cls])
        share = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(share)[:-1] * len(members)).round().astype(int)
        for site, part in enumerate(np.split(members, cuts)):
            owner[part] = site
    return _deal(patients, owner, n_sites)


def quantity_plans(sources: Sequence[SiteCache], n_sites: int, alpha: float, seed: int) -> list[SitePlan]:
    """Quantity skew: site sizes ~ Dirichlet(alpha), patients otherwise dealt at random."""
    patients = pool_patients(sources)
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(n_sites, alpha))
    order = rng.permutation(len(patients))
    cuts = (np.cumsum(share)[:-1] * len(patients)).round().astype(int)
    owner = np.empty(len(patients), dtype=int)
    for site, part in enumerate(np.split(order, cuts)):
        owner[part] = site
    return _deal(patients, owner, n_sites)


def acquisition_shifts(n_sites: int, severity: float, seed: int) -> list[AcquisitionShift]:
    """One virtual scanner per site; at severity 1 up to 20 HU noise, 1.5 px blur, +-15 HU offset
    and half resolution (each site draws its own mix); severity 0 is no shift at all."""
    if severity <= 0:
        return [AcquisitionShift() for _ in range(n_sites)]
    rng = np.random.default_rng(10_007 + seed)
    u = rng.uniform(size=(n_sites, 4))
    return [
        AcquisitionShift(
            noise_hu=round(20 * severity * a, 2),
            blur_px=round(1.5 * severity * b, 3),
            offset_hu=round(15 * severity * (2 * c - 1), 2),
            resolution=round(1 - 0.5 * severity * d, 3),
        )
        for a, b, c, d in u
    ]


def with_shift_and_faults(
    plans: list[SitePlan], severity: float, seed: int, bad_sites: int, fault: Mapping[str, Any]
) -> list[SitePlan]:
    """The plans with their scanner shifts, and the first ``bad_sites`` of them faulty."""
    shifts = acquisition_shifts(len(plans), severity, seed)
    return [
        SitePlan(p.site_id, p.studies, shift, dict(fault) if i < bad_sites else {})
        for i, (p, shift) in enumerate(zip(plans, shifts))
    ]


def degrade(images: np.ndarray, shift: AcquisitionShift, window: tuple[float, float], seed: int) -> np.ndarray:
    """Apply a virtual scanner to preprocessed uint8 slices ``[N, S, S]``: HU quantities become
    grey levels through the cache's window (255 grey levels = the window's width)."""
    from scipy import ndimage

    if shift.is_identity or not len(images):
        return images
    grey_per_hu = 255.0 / (window[1] - window[0])
    inside = images > 0  # offset and noise act on the head; the stripped background stays air
    x = images.astype(np.float32)
    if shift.resolution < 1.0:
        small = ndimage.zoom(x, (1, shift.resolution, shift.resolution), order=1)
        x = ndimage.zoom(small, (1, x.shape[1] / small.shape[1], x.shape[2] / small.shape[2]), order=1)
    if shift.blur_px > 0:
        x = ndimage.gaussian_filter(x, sigma=(0, shift.blur_px, shift.blur_px))
    x = x + inside * np.float32(shift.offset_hu * grey_per_hu)
    if shift.noise_hu > 0:
        noise = np.random.default_rng(seed).normal(0.0, shift.noise_hu * grey_per_hu, size=x.shape).astype(np.float32)
        x = x + inside * noise
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
