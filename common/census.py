"""The federated data census (docs/deploy.md, "Data census"): which statistics a site sends, in which
bins, under which keys. Both sides read the bins from here, so a site's counts and the pool add up.

Every statistic is a vector of counts over fixed bins (or over named categories for the scanner), so
that the pooled census is the sum of the sites' ones. A site suppresses (sends as 0) every bin holding
fewer than its policy's ``census-min-count`` and may add Laplace noise first (``census-noise``,
``client.federation.census``); the names of the suppressed bins travel with the counts.

The bins are tied by sums the server knows (``census_relations``): per label, positives + negatives +
missing = studies; with a mask + without = studies; the thickness bins and the scanners each add up to
the studies; the volume bins add up to the studies with a mask. The study count is public (it is the
census reply's ``num-examples``), so a bin suppressed alone in such a sum would come back by
subtraction. The site therefore suppresses further bins (complementary suppression) until no
suppressed bin is determined by what it sends (``exposed_cells``: no linear combination of the sent
numbers gives it, and the sums with non-negative counts leave it at least two values).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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


#: One census number: (statistic key, bin index); the totals are (STUDIES, 0) and (SLICES, 0).
Cell = tuple[str, int]
#: Totals that are always sent (the study count is also the reply's num-examples) and never suppressed.
PUBLIC: frozenset[Cell] = frozenset({(STUDIES, 0), (SLICES, 0)})


@dataclass(frozen=True)
class Relation:
    """``cells`` add up to ``total``: a sum the server knows, so it can subtract."""

    cells: tuple[Cell, ...]
    total: Cell

    @property
    def members(self) -> tuple[Cell, ...]:
        return (*self.cells, self.total)


def census_relations(counts: Mapping[str, Sequence]) -> list[Relation]:
    """Every additive relation between the statistics present in ``counts`` (a census as sent, or as
    counted): what a server can combine to recover a suppressed bin."""
    study = (STUDIES, 0)
    out = []
    if all(k in counts for k in (LABEL_POS, LABEL_NEG, LABEL_MISSING)):
        out += [Relation(((LABEL_POS, j), (LABEL_NEG, j), (LABEL_MISSING, j)), study) for j in range(len(LABELS))]
    for key in (MASKS, THICKNESS, SCANNER):
        if key in counts and len(counts[key]):
            out.append(Relation(tuple((key, i) for i in range(len(counts[key]))), study))
    if VOLUME in counts and MASKS in counts:  # every study with a mask has a volume (client.federation.census)
        out.append(Relation(tuple((VOLUME, i) for i in range(len(counts[VOLUME]))), (MASKS, 0)))
    return out


def lower_bounds(counts: Mapping[str, Sequence]) -> dict[Cell, float]:
    """What the server knows of a suppressed cell besides the sums: a scanner listed by name has at
    least one study; every other count is at least 0."""
    return {(SCANNER, i): 1.0 for i in range(len(counts.get(SCANNER, [])))}


def exposed_cells(
    values: Mapping[str, Sequence[float]],
    hidden: Collection[Cell],
    relations: Sequence[Relation],
    lower: Mapping[Cell, float] | None = None,
) -> set[Cell]:
    """The hidden cells that ``values`` (the numbers sent; hidden ones are ignored) pin down:

    - linearly: some combination of the relations gives the cell alone (its unit vector lies in the
      row space of the relations restricted to the hidden cells), whatever the sent numbers;
    - with the bounds: the relations and non-negative counts (``lower``) leave it one value (the
      minimum and maximum of a linear programme coincide; each cell is in at most two sums, with
      opposite signs when in two, so the constraint matrix is a network matrix, totally unimodular:
      the programme's ends are integers, and an interval of width >= 1 holds two integer values).

    Noise (``census-noise``) can make the sent numbers inconsistent with the sums; the bounds are then
    not checked (no count fits them exactly), the linear test still is."""
    from scipy.optimize import linprog

    unknown = sorted(set(hidden))
    if not unknown:
        return set()
    col = {c: i for i, c in enumerate(unknown)}
    rows, rhs = [], []
    for rel in relations:
        coeffs = [(c, 1.0) for c in rel.cells] + [(rel.total, -1.0)]
        row, known = np.zeros(len(unknown)), 0.0
        for cell, a in coeffs:
            if cell in col:
                row[col[cell]] += a
            else:
                known += a * float(values[cell[0]][cell[1]])
        if row.any():
            rows.append(row)
            rhs.append(-known)
    if not rows:
        return set()
    a_eq, b_eq = np.array(rows), np.array(rhs)
    rank = np.linalg.matrix_rank(a_eq)
    out = {c for c in unknown if np.linalg.matrix_rank(np.vstack([a_eq, np.eye(len(unknown))[col[c]]])) == rank}
    lower = lower or {}
    bounds = [(float(lower.get(c, 0.0)), None) for c in unknown]
    for cell in unknown:
        if cell in out:
            continue
        ends = []
        for sign in (1.0, -1.0):
            goal = np.zeros(len(unknown))
            goal[col[cell]] = sign
            res = linprog(goal, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
            if res.status == 2:  # infeasible: noisy counts; the bounds say nothing exact
                return out
            ends.append(None if res.status != 0 else sign * res.fun)
        if None not in ends and ends[1] - ends[0] < 0.5:
            out.add(cell)
    return out
