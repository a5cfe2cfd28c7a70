"""Expansion derived from baseline and follow-up mask volumes, and checked against labels.csv."""

from __future__ import annotations

import numpy as np
import pytest

from client.data.cache import SiteCache
from client.data.expansion import (
    ExpansionRule,
    derive_expansion,
    disagreements,
    expansion_label,
    format_disagreements,
    with_derived_expansion,
)
from common.config import LABELS
from tests.helpers.cache import memory_cache, study_entry


def _masks(pixels_per_slice: list[int], size: int = 16) -> np.ndarray:
    out = np.zeros((len(pixels_per_slice), size, size), np.uint8)
    for k, n in enumerate(pixels_per_slice):
        out[k].reshape(-1)[:n] = 1
    return out


def _pair_cache(base: np.ndarray, fu: np.ndarray, given: float | None) -> SiteCache:
    """Baseline S-base (0.5 x 0.5 mm pixels, 5 mm slices) with follow-up S-fu (0.4 x 0.4 mm, 2.5 mm)."""
    masks = np.concatenate([base, fu])
    studies = [
        study_entry("S-base", 0, base, [1, 0, 0, 0, given], followup="S-fu", pixel_mm=(0.5, 0.5), slice_mm=5.0),
        study_entry("S-fu", len(base), fu, [None] * 5, pixel_mm=(0.4, 0.4), slice_mm=2.5),
    ]
    labels = np.zeros((len(masks), len(LABELS)), np.float32)
    return memory_cache(np.zeros_like(masks), masks, labels, studies)


def test_derived_label_equals_a_hand_computation():
    base, fu = _masks([100, 60, 40]), _masks([150, 150, 100, 80])
    # baseline: 200 px x 0.25 mm^2 x 5 mm = 250 mm^3 = 0.25 ml; follow-up: 480 px x 0.16 x 2.5 = 192 mm^3
    (row,) = derive_expansion(_pair_cache(base, fu, given=0))
    assert row.baseline_ml == pytest.approx(0.25) and row.followup_ml == pytest.approx(0.192)
    assert row.derived == 0  # it shrank
    grown = _masks([255, 255, 255, 100])  # 865 px x 0.4 mm^3 = 0.346 ml >= 1.3 x 0.25 = 0.325
    (row,) = derive_expansion(_pair_cache(base, grown, given=1))
    assert row.followup_ml == pytest.approx(0.346) and row.derived == 1 and not row.disagrees
    just_below = _masks([255, 255, 255, 46])  # 811 px -> 0.3244 ml < 0.325
    (row,) = derive_expansion(_pair_cache(base, just_below, given=None))
    assert row.derived == 0 and row.given is None


def test_rule_thresholds_and_the_absolute_option():
    assert expansion_label(10.0, 13.0) == 1 and expansion_label(10.0, 12.99) == 0
    assert expansion_label(10.0, 13.0, ExpansionRule(ratio=1.33)) == 0  # the 33 % definition
    assert expansion_label(30.0, 36.0) == 0
    assert expansion_label(30.0, 36.0, ExpansionRule(absolute_ml=6.0)) == 1  # +6 ml, only +20 %
    assert expansion_label(0.0, 5.0) is None  # no baseline hematoma: nothing to grow
    with pytest.raises(ValueError):
        ExpansionRule(ratio=0.9)


def test_default_rule_is_the_synthetic_generators():
    from simulations.synthetic.generate import EXPANSION_RATIO

    assert ExpansionRule().ratio == EXPANSION_RATIO


def test_disagreements_are_reported_by_pseudonym_only():
    base, fu = _masks([100, 100]), _masks([255] * 4)  # 0.25 ml -> 0.408 ml: grown
    rows = derive_expansion(_pair_cache(base, fu, given=0))
    assert [r.study for r in disagreements(rows)] == ["S-base"]
    text = format_disagreements(rows)
    assert "1 of 1 labelled pairs" in text and "S-base: labels.csv 0, derived 1" in text
    assert "P-S-base" not in text  # the patient pseudonym is not even needed


def test_pairs_without_a_follow_up_or_without_masks_are_left_out():
    base, fu = _masks([50]), _masks([80])
    orphan = study_entry("S-orphan", 2, _masks([30]), [0, 0, 0, 0, 1], followup="S-gone")
    unmasked = study_entry("S-nomask", 3, _masks([0]), [0, 0, 0, 0, 1], followup="S-fu", has_mask=False)
    masks_extra = np.concatenate([_masks([30]), _masks([0])])
    cache = _pair_cache(base, fu, given=1)
    cache = memory_cache(
        np.zeros((4, 16, 16), np.uint8),
        np.concatenate([np.asarray(cache.masks), masks_extra]),
        np.zeros((4, len(LABELS)), np.float32),
        [*cache.studies, orphan, unmasked],
    )
    assert [r.study for r in derive_expansion(cache)] == ["S-base"]


@pytest.mark.slow
def test_derived_labels_agree_with_the_generators_labels(synthetic_root):
    """On generated sites the cache's 64-px masks must reproduce the generator's expansion labels
    (written from the full-resolution masks) but for resampling error near the threshold."""
    from tests.helpers.cache import synthetic_caches

    rows = [r for cache in synthetic_caches(synthetic_root) for r in derive_expansion(cache)]
    compared = [r for r in rows if r.given is not None and r.derived is not None]
    assert len(compared) >= 5 and {r.given for r in compared} == {0, 1}
    assert len(disagreements(rows)) <= 0.1 * len(compared), format_disagreements(rows)


def test_derived_label_fills_the_empty_one_on_the_studys_hematoma_slices():
    base, grown = _masks([100, 60, 0]), _masks([255, 255, 255, 255])  # 160 px -> 0.2 ml; 0.408 ml >= 0.26
    cache = _pair_cache(base, grown, given=None)
    filled, (row,) = with_derived_expansion(cache)
    col = LABELS.index("expansion")
    assert row.derived == 1
    assert filled.studies[0]["labels"][col] == 1.0
    assert filled.slice_labels[:2, col].tolist() == [1.0, 1.0]  # the two hematoma slices
    assert filled.slice_labels[2, col] == 0.0  # a slice without hematoma keeps its 0
    assert cache.studies[0]["labels"][col] is None and cache.slice_labels[0, col] == 0.0  # input untouched


def test_a_given_label_is_kept_even_where_it_disagrees():
    base, grown = _masks([100, 60, 40]), _masks([255, 255, 255, 100])
    cache = _pair_cache(base, grown, given=0)
    filled, (row,) = with_derived_expansion(cache)
    assert row.disagrees and filled is cache  # nothing to fill: the reader's label stands
