"""Validation sums (what sites send) give the same choices as the pooled studies would."""

from __future__ import annotations

import numpy as np
import pytest

from common.study_metrics import (
    StudyOutputs,
    auroc,
    fit_temperature,
    threshold_for_sensitivity,
    youden_threshold,
)
from common.validation import LOGIT_EDGES, ValidationStats, calibration_meta, metric_lengths, selection_score


def outputs(seed: int, n: int = 40) -> StudyOutputs:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=(n, 2)).astype(float)
    y[0, 1] = np.nan  # not annotated: left out
    # Logits on bin centres: no two studies of different score share a bin, so binned = exact.
    centres = (LOGIT_EDGES[:-1] + LOGIT_EDGES[1:]) / 2
    z = centres[rng.integers(20, 108, size=(n, 2))] + 1.5 * np.nan_to_num(y)
    keys = np.asarray([f"s{seed}-{i}" for i in range(n)])
    return StudyOutputs(("a", "b"), keys, keys, np.full(n, f"site{seed}"), y, z, np.zeros(n, bool))


def pooled(parts):
    return StudyOutputs(
        ("a", "b"),
        *(np.concatenate([getattr(p, k) for p in parts]) for k in ("studies", "patients", "sites", "labels", "logits")),
        np.concatenate([p.fallback for p in parts]),
    )


def test_summed_site_stats_equal_the_pooled_studies_choices():
    parts = [outputs(s) for s in range(3)]
    summed = sum((ValidationStats.from_outputs(p) for p in parts[1:]), ValidationStats.from_outputs(parts[0]))
    allv = pooled(parts)
    for c in range(2):
        assert summed.auroc()[c] == pytest.approx(auroc(allv.labels[:, c], allv.logits[:, c]))
    np.testing.assert_allclose(summed.temperature(), fit_temperature(allv.logits, allv.labels))
    # Thresholds on the logit scale (temperature 1): the bin's lower edge = the pooled rule's threshold bin.
    th = summed.thresholds()
    for c in range(2):
        p = 1 / (1 + np.exp(-allv.logits[:, c]))
        exact = youden_threshold(allv.labels[:, c], p)
        assert th[c] <= exact and np.searchsorted(LOGIT_EDGES, np.log(th[c] / (1 - th[c])) + 1e-9) == np.searchsorted(
            LOGIT_EDGES, np.log(exact / (1 - exact))
        )
    sens = summed.thresholds(target_sensitivity=0.9)
    for c in range(2):
        p = 1 / (1 + np.exp(-allv.logits[:, c]))
        exact = threshold_for_sensitivity(allv.labels[:, c], p, 0.9)
        y = allv.labels[:, c]
        assert np.mean(p[y == 1] >= sens[c]) >= 0.9 and sens[c] <= exact


def test_round_trip_through_metrics_and_meta():
    stats = ValidationStats.from_outputs(outputs(0), [(10, 2, 3), (5, 0, 1)])
    back = ValidationStats.from_metrics(stats.to_metrics(), 2)
    np.testing.assert_array_equal(back.pos_hist, stats.pos_hist)
    assert back.dice() == pytest.approx(2 * 15 / (30 + 2 + 4)) == selection_score(back, 1, [0, 1])
    assert selection_score(back, 2, [0, 1]) == pytest.approx(np.mean(stats.auroc()))
    with pytest.raises(ValueError, match="val/pos_hist"):
        ValidationStats.from_metrics({**stats.to_metrics(), "val/pos_hist": [1.0]}, 2)
    meta = calibration_meta(stats, ["a", "b"])
    assert set(meta["thresholds"]) == set(meta["temperature"]) == {"a", "b"}
    with pytest.raises(ValueError, match="target sensitivity"):
        stats.thresholds(1.5)


def test_missing_class_gives_half():
    o = outputs(1)
    y = np.zeros_like(o.labels)
    stats = ValidationStats.from_outputs(StudyOutputs(o.names, o.studies, o.patients, o.sites, y, o.logits, o.fallback))
    assert np.isnan(stats.auroc()).all()
    np.testing.assert_array_equal(stats.thresholds(), [0.5, 0.5])


def test_metric_lengths_describe_what_a_site_sends():
    sent = ValidationStats.from_outputs(outputs(2), [(1, 2, 3)]).to_metrics()
    lengths = metric_lengths(2)
    assert set(sent) == set(lengths)
    for key, n in lengths.items():
        assert (len(sent[key]) if isinstance(sent[key], list) else 0) == n
        if key != "val/temperature_nll":
            assert all(isinstance(v, int) and v >= 0 for v in (sent[key] if n else [sent[key]]))


def test_only_rounds_that_can_be_chosen_are_scored_on_validation():
    from common.validation import selectable

    assert selectable(2, 4) and selectable(2, 0)
    assert not selectable(1, 4)  # a stage-2 round will beat it
    assert selectable(1, 0)  # a U-Net-only run chooses among its stage-1 rounds


def test_eval_test_rounds_picks_the_scored_rounds():
    from common.run_config import parse_run_config
    from common.validation import evaluated
    from tests.helpers.flower import run_config

    def scored(s1: int, s2: int, mode: str) -> list[int]:
        return [r for r in range(1, s1 + s2 + 1) if evaluated(r, s1, s2, mode)]

    assert scored(4, 1, "every") == [1, 2, 3, 4, 5]
    assert scored(4, 1, "stage-ends") == [4, 5]
    assert scored(4, 1, "last") == [5]
    assert scored(3, 2, "last") == [4, 5]  # stage-2 rounds can be chosen: scored on validation anyway
    assert scored(3, 0, "last") == [1, 2, 3]  # a U-Net-only run chooses among its stage-1 rounds
    with pytest.raises(ValueError, match="eval.test-rounds must be one of"):
        parse_run_config(run_config(**{"eval.test-rounds": "sometimes"}))


def test_a_near_constant_classifier_still_ranks_on_the_pooled_histograms():
    """Study logits spread over 0.16 logit (a classifier that has barely moved from its start) and
    ranked perfectly: the binned validation AUROC stays near the exact 1.0 (with 0.125-wide bins
    those studies fell into two bins and it read 0.825)."""
    n = 40
    y = (np.arange(n) >= n // 2).astype(float)[:, None].repeat(2, 1)
    z = (2.95 + 0.004 * np.arange(n))[:, None].repeat(2, 1)
    keys = np.asarray([f"s{i}" for i in range(n)])
    stats = ValidationStats.from_outputs(StudyOutputs(("a", "b"), keys, keys, keys, y, z, np.zeros(n, bool)))
    assert auroc(y[:, 0], z[:, 0]) == 1.0
    assert stats.auroc()[0] > 0.95
