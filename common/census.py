"""The federated data census (docs/deploy.md, "Data census"): which statistics a site sends, in which
bins, under which keys. Both sides read the bins from here, so a site's counts and the pool add up.

Every statistic is a vector of counts over fixed bins (or over named categories for the scanner), so
that the pooled census is the sum of the sites' ones. A site suppresses (sends as 0) every bin holding
fewer than its policy's ``census-min-count`` and may add Laplace noise first (``census-noise``,
``client.federation.census``); the names of the suppressed bins travel with the counts.
"""

from __future__ import annotations

import math

from common.config import LABELS

#: The ``query`` action of the census message (``query.census``).
CENSUS_ACTION = "census"
#: The reply's record (a ConfigRecord: int lists, the scanner names, the suppressed bins).
CENSUS = "census"

#: HU inside the brain (cached slices: window-mapped, pixels outside the stripped brain are 0): 5 HU bins.
HU_EDGES: tuple[float, ...] = tuple(float(v) for v in range(0, 85, 5))
#: Hematoma volume per study with a mask, ml.
VOLUME_EDGES_ML: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0, 30.0, 60.0, math.inf)
#: Slice thickness per study (DICOM SpacingBetweenSlices, else SliceThickness), mm.
THICKNESS_EDGES_MM: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.5, math.inf)

#: Keys of binned statistics in the CENSUS record and their bin labels.
HU = "hu-brain"
VOLUME = "hematoma-ml"
THICKNESS = "slice-thickness-mm"
SCANNER = "scanner"
SCANNER_NAMES = "scanner-names"
LABEL_POS, LABEL_NEG, LABEL_MISSING = "studies-positive", "studies-negative", "studies-missing"
MASKS = "studies-with-mask"  # [with a mask, without]
STUDIES, SLICES = "studies", "slices"
SUPPRESSED = "suppressed"  # "<key>/<bin label>" of every bin sent as 0
UNKNOWN = "unknown"


def bin_labels(edges: tuple[float, ...]) -> list[str]:
    """``[a, b)`` bins as text (``"5-10"``, ``"60+"``)."""
    return [f"{a:g}+" if math.isinf(b) else f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]


#: The binned statistics and their labels (the scanner's are the site's names; labels are LABELS).
BINNED: dict[str, list[str]] = {
    HU: bin_labels(HU_EDGES),
    VOLUME: bin_labels(VOLUME_EDGES_ML),
    THICKNESS: [*bin_labels(THICKNESS_EDGES_MM), UNKNOWN],
    LABEL_POS: list(LABELS),
    LABEL_NEG: list(LABELS),
    LABEL_MISSING: list(LABELS),
    MASKS: ["with mask", "without"],
}
