"""The site's half of the data census (``query.census``, ``common.census``): summary statistics of
its cache, guarded by its policy, and nothing else (docs/deploy.md, "Data census").

Computed from the site cache (HU inside the brain, hematoma volume, labels, masks) and one DICOM
header per study (scanner, slice thickness). The hematoma volume is the one rule
(``client.data.expansion.study_volume_ml``: the spacing of the slice positions, not the header's
thickness), so a study's census volume is the one its derived expansion label grows from; a study
without DICOM headers (CT-ICH, a simulation partition) has a volume too. The guard adds the
policy's Laplace noise to every bin and then suppresses (sends as 0) every bin under
``census-min-count``; totals are sent as counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from client.data.cache import SiteCache, pseudonym, site_secret
from client.data.expansion import study_volume_ml
from client.federation.node import SiteNode
from client.federation.policy import SitePolicy
from client.ingest.dicom import read_acquisition
from client.ingest.dicom_layout import discover_studies
from common.census import (
    BINNED,
    HU,
    HU_EDGES,
    LABEL_MISSING,
    LABEL_NEG,
    LABEL_POS,
    MASKS,
    SCANNER,
    SCANNER_NAMES,
    SLICES,
    STUDIES,
    SUPPRESSED,
    THICKNESS,
    THICKNESS_EDGES_MM,
    UNKNOWN,
    VOLUME,
    VOLUME_EDGES_ML,
)
from common.config import LABELS


@dataclass(frozen=True)
class Acquisition:
    scanner: str
    thickness_mm: float | None


def site_acquisitions(site: SiteNode) -> dict[str, Acquisition]:
    """Scanner and slice thickness per study, keyed by the cache's study pseudonym (DICOM layout; a
    CT-ICH site or a simulation partition has none: its studies count as unknown)."""
    if site.cache_path is not None:
        return {}
    refs, _ = discover_studies(site.data_path)
    secret = site_secret(site.cache_dir)
    return {
        pseudonym(secret, "study", f"{r.patient_id}/{r.study_id}"): Acquisition(*read_acquisition(r.dicom_dir))
        for r in refs
    }


def census_counts(cache: SiteCache, acquisitions: Mapping[str, Acquisition]) -> dict[str, list[int]]:
    """Every census statistic of the cache, unguarded; scanner counts follow ``SCANNER_NAMES``' order
    (returned under that key as a list of names)."""
    index, images = cache.index, cache.images
    lo, hi = (float(v) for v in index["preprocess"]["window"])
    hu = np.zeros(len(HU_EDGES) - 1, dtype=np.int64)
    volumes, thickness, scanners = [], Counter(), Counter()
    labels = np.array([[np.nan if v is None else v for v in s["labels"]] for s in index["studies"]], dtype=float)
    for study in index["studies"]:
        pixels = np.asarray(images[study["start"] : study["stop"]])
        inside = pixels[pixels > 0].astype(np.float64)
        hu += np.histogram(lo + inside * (hi - lo) / 255.0, bins=HU_EDGES)[0]
        acq = acquisitions.get(study["study"], Acquisition(UNKNOWN, None))
        scanners[acq.scanner] += 1
        thickness[_bin(acq.thickness_mm, THICKNESS_EDGES_MM)] += 1
        if study["has_mask"]:  # slice positions' spacing (the cache's), not the header's thickness
            volumes.append(study_volume_ml(study))
    labels = labels.reshape(-1, len(LABELS))
    with_mask = sum(bool(s["has_mask"]) for s in index["studies"])
    names = sorted(scanners)
    return {
        HU: hu.tolist(),
        VOLUME: np.histogram(volumes, bins=VOLUME_EDGES_ML)[0].tolist(),
        THICKNESS: [thickness[i] for i in range(len(BINNED[THICKNESS]))],
        LABEL_POS: (labels == 1).sum(axis=0).tolist(),
        LABEL_NEG: (labels == 0).sum(axis=0).tolist(),
        LABEL_MISSING: np.isnan(labels).sum(axis=0).tolist(),
        MASKS: [with_mask, len(index["studies"]) - with_mask],
        SCANNER: [scanners[n] for n in names],
        SCANNER_NAMES: names,
        STUDIES: [len(index["studies"])],
        SLICES: [int(index["n_slices"])],
    }


def _bin(value: float | None, edges: tuple[float, ...]) -> int:
    """The bin of ``value`` (the extra last bin for unknown)."""
    if value is None:
        return len(edges) - 1
    return int(np.searchsorted(edges, value, side="right") - 1)


def guard_census(
    counts: Mapping[str, list], policy: SitePolicy, rng: np.random.Generator | None = None
) -> dict[str, list]:
    """The counts as they may leave: noise (``census-noise``, Laplace, rounded, at least 0) on every
    bin, then every bin under ``census-min-count`` sent as 0 and named in ``SUPPRESSED``."""
    rng = rng or np.random.default_rng()  # OS entropy: the server must not be able to replay the noise
    out: dict[str, list] = {}
    suppressed = []
    for key, values in counts.items():
        if key in (SCANNER_NAMES, STUDIES, SLICES):
            out[key] = list(values)
            continue
        v = np.asarray(values, dtype=np.float64)
        if policy.census_noise:
            v = np.maximum(np.rint(v + rng.laplace(0.0, policy.census_noise, v.shape)), 0)
        names = counts[SCANNER_NAMES] if key == SCANNER else BINNED[key]
        low = (v > 0) & (v < policy.census_min_count)
        suppressed += [f"{key}/{names[i]}" for i in np.flatnonzero(low)]
        out[key] = [int(x) for x in np.where(low, 0, v)]
    out[SUPPRESSED] = suppressed
    return out


def census_record(counts: Mapping[str, list]) -> ConfigRecord:
    return ConfigRecord({k: list(v) for k, v in counts.items()})
