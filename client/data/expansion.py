"""Hematoma expansion derived from baseline and follow-up mask volumes (docs/gan.md).

A baseline study's cache entry names its follow-up study (``followup``: the follow-up's study
pseudonym, from labels.csv's ``followup_study_id``). Both studies' masks give a hematoma volume
(``study_volume_ml``: voxel count x model pixel area x the spacing of the slice positions, the
census's rule too), and expansion is their growth:

- relative (default): follow-up >= ``ratio`` x baseline. The default 1.3 (>= 30 % growth) is the
  synthetic generator's rule (``simulations.synthetic.generate.EXPANSION_RATIO``), so derived and
  written labels agree there; ``ratio = 1.33`` gives the other common clinical definition (33 %).
- absolute (option): follow-up - baseline >= ``absolute_ml`` (6 ml is the usual choice), OR-ed
  with the relative rule when set.

Where labels.csv gives an expansion label too, ``disagreements`` lists the studies whose label
differs from the derived one, by study pseudonym (never a patient id).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np

from client.data.cache import SiteCache
from common.config import LABELS
from common.metrics import hematoma_volume_ml

#: labels.csv's expansion column in a study's ``labels`` list.
EXPANSION_COLUMN: int = LABELS.index("expansion")


@dataclass(frozen=True)
class ExpansionRule:
    """When a hematoma has expanded: relative growth, optionally OR-ed with absolute growth in ml."""

    ratio: float = 1.3
    absolute_ml: float | None = None

    def __post_init__(self) -> None:
        if not self.ratio > 1.0:
            raise ValueError(f"ratio must be > 1 (growth), got {self.ratio}")
        if self.absolute_ml is not None and not self.absolute_ml > 0:
            raise ValueError(f"absolute_ml must be > 0 or None, got {self.absolute_ml}")


def expansion_label(baseline_ml: float, followup_ml: float, rule: ExpansionRule = ExpansionRule()) -> int | None:
    """1 if the hematoma grew by ``rule``, else 0; None without a baseline hematoma (nothing to grow)."""
    if baseline_ml <= 0:
        return None
    grew = followup_ml >= rule.ratio * baseline_ml
    if rule.absolute_ml is not None:
        grew = grew or followup_ml - baseline_ml >= rule.absolute_ml
    return int(grew)


def study_volume_ml(study: dict) -> float:
    """Hematoma volume of a cache study entry (its reference mask pixels at the model's pixel size,
    and the spacing of its slice positions): ``common.metrics.hematoma_volume_ml``, as the census counts."""
    return hematoma_volume_ml(sum(study["mask_pixels"]), study["pixel_mm"], study["slice_mm"])


@dataclass(frozen=True)
class ExpansionRow:
    """One baseline / follow-up pair: volumes, the derived label and labels.csv's (None = not given)."""

    study: str
    followup: str
    baseline_ml: float
    followup_ml: float
    derived: int | None
    given: int | None

    @property
    def disagrees(self) -> bool:
        return self.derived is not None and self.given is not None and self.derived != self.given


def derive_expansion(cache: SiteCache, rule: ExpansionRule = ExpansionRule()) -> list[ExpansionRow]:
    """One row per baseline study whose follow-up is in the cache, both with ground-truth masks.

    Studies whose follow-up is missing (not delivered, rejected) or lacks a mask are left out:
    their expansion cannot be derived.
    """
    by_name = {s["study"]: s for s in cache.studies}
    rows = []
    for s in cache.studies:
        fu = by_name.get(s.get("followup") or "")
        if fu is None or not (s["has_mask"] and fu["has_mask"]):
            continue
        base_ml, fu_ml = study_volume_ml(s), study_volume_ml(fu)
        given = s["labels"][EXPANSION_COLUMN]
        rows.append(
            ExpansionRow(
                s["study"],
                fu["study"],
                base_ml,
                fu_ml,
                expansion_label(base_ml, fu_ml, rule),
                None if given is None else int(given),
            )
        )
    return rows


def with_derived_expansion(
    cache: SiteCache, rule: ExpansionRule = ExpansionRule()
) -> tuple[SiteCache, list[ExpansionRow]]:
    """The cache with labels.csv's empty expansion labels filled from the derived ones, and the rows.

    A given label is kept (``format_disagreements`` reports where it differs): the site's reader
    outranks a volume rule. A filled label goes where labels.csv's would have gone: the study's
    labels in the index and its hematoma slices (more than the cache's ``min_mask_pixels``), so
    training and study-level evaluation read it like a given one. The returned cache holds its
    labels in memory; the files on disk stay as built.
    """
    rows = derive_expansion(cache, rule)
    fill = {r.study: r.derived for r in rows if r.given is None and r.derived is not None}
    if not fill:
        return cache, rows
    index = copy.deepcopy(cache.index)
    labels = np.array(cache.slice_labels, dtype=np.float32)
    min_pixels = int(index.get("preprocess", {}).get("min_mask_pixels", 0))
    for s in index["studies"]:
        if s["study"] not in fill:
            continue
        s["labels"][EXPANSION_COLUMN] = float(fill[s["study"]])
        holds = np.asarray(s["mask_pixels"]) > min_pixels
        labels[np.arange(s["start"], s["stop"])[holds], EXPANSION_COLUMN] = fill[s["study"]]
    return replace(cache, index=index, slice_labels=labels), rows


def disagreements(rows: list[ExpansionRow]) -> list[ExpansionRow]:
    """The pairs whose labels.csv expansion label differs from the derived one."""
    return [r for r in rows if r.disagrees]


def format_disagreements(rows: list[ExpansionRow]) -> str:
    """A report line per disagreement, by study pseudonym, volumes rounded to 0.1 ml."""
    bad = disagreements(rows)
    compared = sum(1 for r in rows if r.derived is not None and r.given is not None)
    lines = [f"expansion: {len(bad)} of {compared} labelled pairs disagree with the mask volumes"]
    lines += [
        f"  {r.study}: labels.csv {r.given}, derived {r.derived} ({r.baseline_ml:.1f} ml -> {r.followup_ml:.1f} ml)"
        for r in bad
    ]
    return "\n".join(lines)
