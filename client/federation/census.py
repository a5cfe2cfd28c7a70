"""The site's half of the data census (``query.census``, ``common.census``): summary statistics of
its cache, guarded by its policy, and nothing else (docs/deploy.md, "Data census").

Computed from the site cache (HU inside the brain, hematoma volume, labels, masks) and one DICOM
header per study (scanner, slice thickness). The hematoma volume is the one rule
(``client.data.expansion.study_volume_ml``: the spacing of the slice positions, not the header's
thickness), so a study's census volume is the one its derived expansion label grows from; a study
without DICOM headers (CT-ICH, a simulation partition) has a volume too. The guard adds the
policy's Laplace noise to every bin, suppresses (sends as 0) every bin under ``census-min-count``,
then suppresses further bins, chosen at random, until no suppressed bin can be recovered from the
sums the server knows (``common.census.census_relations``); the totals (studies, slices) are sent as
counted, the study count being public anyway.
"""

from __future__ import annotations

import hmac
import json
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
    PUBLIC,
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
    Cell,
    Relation,
    census_relations,
    exposed_cells,
    lower_bounds,
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


def census_key(site: SiteNode) -> bytes:
    """The key that draws this site's complementary bins: its pseudonym secret (never sent)."""
    return site_secret(site.cache_dir)


def guard_census(
    counts: Mapping[str, list],
    policy: SitePolicy,
    rng: np.random.Generator | None = None,
    secret: bytes | None = None,
) -> dict[str, list]:
    """The counts as they may leave: noise (``census-noise``, Laplace, rounded, at least 0) on every
    bin, every bin under ``census-min-count`` sent as 0, and as many more bins sent as 0 as it takes
    for none of them to follow from the rest and the totals (``complete_suppression``); every bin sent
    as 0 for either reason is named in ``SUPPRESSED`` (which were under the minimum is not said).

    With ``secret`` the complementary bins are drawn from a keyed hash of the counts, so a census asked
    again of the same data hides the same bins (two different draws could be combined: one hiding
    positives and missing, the other positives and negatives, would give the positives back), and
    the server, without the key, cannot predict the draw; without it, from ``rng``."""
    rng = rng or np.random.default_rng()  # OS entropy: the server must not be able to replay the noise
    draw = rng
    if secret is not None:
        canonical = json.dumps({k: list(v) for k, v in sorted(counts.items())}, default=int).encode()
        digest = hmac.digest(secret, b"hemexp/census-complements|" + canonical, "sha256")
        draw = np.random.default_rng(int.from_bytes(digest, "big"))
    values: dict[str, np.ndarray] = {}
    for key, raw in counts.items():
        if key == SCANNER_NAMES:
            continue
        v = np.asarray(raw, dtype=np.float64)
        if key not in (STUDIES, SLICES) and policy.census_noise:
            v = np.maximum(np.rint(v + rng.laplace(0.0, policy.census_noise, v.shape)), 0)
        values[key] = v
    small = {
        (key, int(i))
        for key, v in values.items()
        if key not in (STUDIES, SLICES)
        for i in np.flatnonzero((v > 0) & (v < policy.census_min_count))
    }
    hidden = complete_suppression(values, small, census_relations(counts), lower_bounds(counts), draw)
    out: dict[str, list] = {}
    suppressed = []
    for key, raw in counts.items():
        if key == SCANNER_NAMES:
            out[key] = list(raw)
            continue
        names = counts[SCANNER_NAMES] if key == SCANNER else BINNED.get(key, [])
        out[key] = [0 if (key, i) in hidden else int(x) for i, x in enumerate(values[key])]
        suppressed += [f"{key}/{names[i]}" for i in range(len(out[key])) if (key, i) in hidden]
    out[SUPPRESSED] = suppressed
    return out


def complete_suppression(
    values: Mapping[str, np.ndarray],
    small: set[Cell],
    relations: list[Relation],
    lower: Mapping[Cell, float],
    rng: np.random.Generator,
) -> set[Cell]:
    """``small`` and the complementary cells that protect it: while a sum has exactly one hidden cell
    (its total counting as one, the study count never), hide another of its cells; then, while a
    hidden cell is still pinned down (``exposed_cells``: by a combination of sums, or by the sums and
    non-negative counts), hide another cell of a sum it is in. The cells are drawn at random: a rule
    such as "the smallest other bin" would tell the server which hidden cell is the small one."""
    hidden = set(small)
    while True:
        changed = True
        while changed:
            changed = False
            for rel in relations:
                if sum(c in hidden for c in rel.members) == 1:
                    changed |= _hide_another(rel, hidden, rng)
        exposed = sorted(exposed_cells(values, hidden, relations, lower))
        if not exposed:
            return hidden
        for cell in exposed:
            around = [rel for rel in relations if cell in rel.members]
            if any(_hide_another(around[i], hidden, rng) for i in rng.permutation(len(around))):
                break
        else:
            return hidden  # what stays exposed follows from the public study count alone (one scanner)


def _hide_another(rel: Relation, hidden: set[Cell], rng: np.random.Generator) -> bool:
    """Hide one more cell of ``rel`` (a bin if one is left, else its total unless public); False if none."""
    free = [c for c in rel.cells if c not in hidden]
    if not free and rel.total not in hidden and rel.total not in PUBLIC:
        free = [rel.total]
    if not free:
        return False
    hidden.add(free[int(rng.integers(len(free)))])
    return True


def census_record(counts: Mapping[str, list]) -> ConfigRecord:
    return ConfigRecord({k: list(v) for k, v in counts.items()})
