"""Study-level metrics against scikit-learn and hand values; bootstrap coverage; temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve

from common.study_metrics import (
    STUDY_SLICES,
    StudyOutputs,
    auprc,
    auroc,
    bootstrap_ci,
    brier,
    choose_thresholds,
    class_strata,
    concat_outputs,
    dice_interval,
    ece,
    fit_temperature,
    fit_temperature_from_stats,
    paired_difference,
    per_site_rows,
    resamples,
    rule_slices,
    sensitivity_specificity,
    slice_auroc_on_hematoma,
    stratum_mean,
    study_scores_from_slices,
    summarise,
    temperature_nll_stats,
    threshold_for_sensitivity,
    youden_threshold,
)

NAN = float("nan")


def test_one_rule_takes_the_max_over_predicted_hematoma_slices_else_all() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.4], [0.3, 0.8], [0.6, 0.5], [0.7, 0.2]])
    studies = np.array(["A", "A", "A", "B", "B"])
    pixels = np.array([0, 20, 30, 5, 0])  # A: slices 1 and 2 hold hematoma; B: none above 10
    out = study_scores_from_slices(scores, studies, pixels, min_pixels=10)
    assert out.studies.tolist() == ["A", "B"]
    np.testing.assert_array_equal(out.values, [[0.3, 0.8], [0.7, 0.5]])  # A ignores slice 0's 0.9
    assert out.fallback.tolist() == [False, True]
    with pytest.raises(ValueError, match="4 study ids and 5 pixel counts for 5 slices"):
        study_scores_from_slices(scores, studies[:4], pixels, 10)


def test_the_rule_uses_the_three_slices_with_most_hematoma() -> None:
    """A study spanning six hematoma slices: only the three largest count, whatever the others score
    (a maximum over every slice would grow with the hematoma's extent); ties go to the earlier slice."""
    assert STUDY_SLICES == 3
    pixels = np.array([12, 40, 90, 15, 60, 40, 3])
    np.testing.assert_array_equal(rule_slices(pixels, 10), [1, 2, 4])
    np.testing.assert_array_equal(rule_slices(pixels, 10, k=1), [2])
    np.testing.assert_array_equal(rule_slices(np.array([0, 5, 10]), 10), [0, 1, 2])  # none holds: all
    scores = np.array([0.95, 0.2, 0.3, 0.9, 0.1, 0.4, 0.99])
    out = study_scores_from_slices(scores, np.zeros(7), pixels, 10)
    assert out.values.tolist() == [0.3] and out.fallback.tolist() == [False]  # not 0.95 / 0.9 (small slices)


def test_auroc_auprc_brier_match_sklearn_with_ties_and_nan_labels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40).astype(float)
        s = np.round(rng.random(40), 1)  # ties
        y[:3] = NAN
        k = ~np.isnan(y)
        assert auroc(y, s) == pytest.approx(roc_auc_score(y[k], s[k]))
        assert auprc(y, s) == pytest.approx(average_precision_score(y[k], s[k]))
        assert brier(y, s) == pytest.approx(brier_score_loss(y[k], s[k]))
    assert np.isnan(auroc([1, 1, NAN], [0.2, 0.3, 0.1])) and np.isnan(auprc([0, 0], [0.2, 0.3]))


def test_the_one_auroc_equals_sklearn_on_random_data_with_ties() -> None:
    """``auroc`` (numpy, Mann-Whitney) is THE AUROC of sites, server, report and benchmarks; scikit-learn's
    ``roc_auc_score`` is the independent reference, on few to many distinct scores and any class balance."""
    rng = np.random.default_rng(28)
    for trial in range(200):
        n = int(rng.integers(2, 300))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(float)
        levels = int(rng.integers(1, 12)) if trial % 2 else n  # heavy ties, or (almost) none
        s = rng.integers(0, levels, n) / max(levels, 1) + (0.0 if trial % 2 else rng.random(n))
        y[rng.random(n) < 0.1] = NAN
        k = ~np.isnan(y)
        if (y[k] == 1).any() and (y[k] == 0).any():
            assert auroc(y, s) == pytest.approx(roc_auc_score(y[k], s[k]), abs=1e-12), trial
        else:
            assert np.isnan(auroc(y, s)), trial
    # ties count half: (1 > 0, 1 > 0, 0 ~ 0, 0 ~ 0) over 4 pairs; one constant score: 0.5
    assert auroc([1, 1, 0, 0], [1.0, 0.0, 0.0, 0.0]) == 0.75
    assert auroc([1, 0, 1, 0, NAN], [3, 3, 3, 3, 9]) == 0.5
    assert np.isnan(auroc([0, 0, NAN], [0.1, 0.2, 0.3])) and np.isnan(auroc([NAN, NAN], [0.1, 0.2]))


def test_ece_by_hand() -> None:
    assert ece([0, 0, 1, 1], [0.05, 0.15, 0.85, 0.95]) == pytest.approx((0.05 + 0.15 + 0.15 + 0.05) / 4)
    # bin [0.1, 0.2): rate 0.5 vs mean 0.15 over 2 of 4 studies; 0.9 and 1.0 share the last bin
    assert ece([0, 1, 1, 1], [0.12, 0.18, 0.9, 1.0]) == pytest.approx(0.35 * 2 / 4 + 0.05 * 2 / 4)
    assert ece([1, 0], [1.0, 0.0]) == 0.0


def test_operating_points_and_thresholds() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.3, 0.9, 0.7, 0.65])
    assert sensitivity_specificity(y, p, 0.5) == (0.75, 0.75)
    fpr, tpr, th = roc_curve(y, p)
    assert youden_threshold(y, p) == pytest.approx(th[np.argmax(tpr - fpr)])
    assert threshold_for_sensitivity(y, p, 1.0) == 0.3 and threshold_for_sensitivity(y, p, 0.75) == 0.65
    assert sensitivity_specificity(y, p, threshold_for_sensitivity(y, p, 0.7))[0] >= 0.7
    labels = np.stack([y, np.ones(8)], 1)
    np.testing.assert_allclose(choose_thresholds(labels, np.stack([p, p], 1)), [youden_threshold(y, p), 0.5])
    with pytest.raises(ValueError, match="target sensitivity must be in"):
        threshold_for_sensitivity(y, p, 0.0)


def _clustered(rng, n_pos: int, n_neg: int, d: float):
    """Two studies per patient sharing a patient effect: study score = u + e, u ~ N(d * y, 1), e ~ N(0, 1)."""
    n = n_pos + n_neg
    y_pat = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    u = rng.normal(d * y_pat, 1.0)
    scores = np.repeat(u, 2) + rng.normal(0, 1, 2 * n)
    return np.repeat(y_pat, 2), scores, np.repeat(np.arange(n).astype(str), 2)


def test_patient_bootstrap_covers_a_known_auc_at_about_the_nominal_rate() -> None:
    d = 1.5
    true_auc = norm.cdf(d / np.sqrt(2 * 2.0))  # difference of two independent N(., 2) study scores
    rng = np.random.default_rng(1)
    trials, hits = 120, 0
    for t in range(trials):
        y, s, patients = _clustered(rng, 20, 20, d)
        ci = bootstrap_ci(lambda idx, y=y, s=s: auroc(y[idx], s[idx]), patients, y, n_boot=200, seed=t)
        hits += ci.low <= true_auc <= ci.high
    assert 0.88 <= hits / trials <= 0.99


def test_bootstrap_drops_replicates_without_both_classes_and_is_seeded() -> None:
    y, s, pat = np.array([1.0, 0, 0, 0, 0, 0]), np.arange(6.0)[::-1], np.arange(6).astype(str)
    a = bootstrap_ci(lambda idx: auroc(y[idx], s[idx]), pat, n_boot=300, seed=3)
    assert a.estimate == 1.0 and 0 < a.n_boot < 300  # some draws miss the only positive
    assert a == bootstrap_ci(lambda idx: auroc(y[idx], s[idx]), pat, n_boot=300, seed=3)


def test_resamples_draw_whole_patients_within_strata_and_every_metric_shares_them() -> None:
    """Each replicate draws, per stratum, as many patients as it has, each drawn patient with all of its
    rows; the draws follow the seeded generator stratum by stratum (a hand re-implementation)."""
    patients = np.array(["a", "a", "b", "c", "c", "c", "d", "e"])
    strata = np.array(["0", "0", "0", "0", "0", "0", "1", "1"])
    draws = resamples(patients, strata, n_boot=50, seed=5)
    rng = np.random.default_rng(5)
    rows = {("0", "a"): [0, 1], ("0", "b"): [2], ("0", "c"): [3, 4, 5], ("1", "d"): [6], ("1", "e"): [7]}
    groups = sorted(rows)  # the groups in (stratum, patient) order
    for idx in draws:
        expect = []
        for stratum in ("0", "1"):
            members = [g for g in groups if g[0] == stratum]
            expect += [r for k in rng.integers(0, len(members), len(members)) for r in rows[members[k]]]
        assert idx.tolist() == expect
    # a row's metrics are computed on the same replicates as a lone bootstrap of one of them
    y, p = np.array([0, 1, 0, 1, 1, 0, 1, 0.0]), np.linspace(0.1, 0.9, 8)
    row = summarise(_outputs(y, np.log(p / (1 - p)), patients=patients), n_boot=200, seed=2)[0]
    alone = bootstrap_ci(lambda idx: auroc(y[idx], p[idx]), patients, _class_strata(y, patients), 200, seed=2)
    assert row["auroc"] == alone.to_dict()


def _class_strata(y: np.ndarray, patients: np.ndarray) -> np.ndarray:
    return class_strata(y, patients, np.zeros(len(y), dtype=str))


def _outputs(y, logits, patients=None, sites=None, names=("m",)) -> StudyOutputs:
    y, logits = np.asarray(y, float).reshape(len(y), -1), np.asarray(logits, float).reshape(len(y), -1)
    n = len(y)
    return StudyOutputs(
        tuple(names),
        np.asarray([f"s{i}" for i in range(n)]),
        np.asarray(patients if patients is not None else [f"p{i}" for i in range(n)]),
        np.asarray(sites if sites is not None else ["A"] * n),
        y,
        logits,
        np.zeros(n, bool),
    )


def test_seeds_are_averaged_not_pooled() -> None:
    perfect = _outputs([0, 0, 1, 1], [-2, -1, 1, 2])
    chance = _outputs([0, 1, 1, 0], [10, 11, 12, 13])  # AUC 0.5
    both = concat_outputs([perfect, chance], strata=["seed=0", "seed=1"])
    stat = stratum_mean(lambda idx: auroc(both.labels[idx, 0], both.logits[idx, 0]), both.strata())
    assert stat(np.arange(8)) == pytest.approx(0.75)
    assert summarise(both, n_boot=0)[0]["auroc"]["estimate"] == pytest.approx(0.75)
    # pooled instead of averaged, the two seeds' scores would mix: a different number
    assert auroc(both.labels[:, 0], both.logits[:, 0]) != pytest.approx(0.75)


def test_per_site_rows_leave_a_cell_empty_only_without_a_class() -> None:
    out = _outputs([0, 1, 0, 1, 0, 0], [-1, 1, -2, 2, -1, 0.5], sites=["A"] * 4 + ["B"] * 2)
    rows = {r["site"]: r for r in per_site_rows(out, n_boot=50)}
    assert rows["A"]["n"] == 4 and rows["A"]["n_pos"] == 2 and rows["A"]["auroc"]["estimate"] == 1.0
    assert rows["B"]["n_pos"] == 0 and np.isnan(rows["B"]["auroc"]["estimate"])
    assert rows["B"]["brier"]["estimate"] == pytest.approx(brier([0, 0], 1 / (1 + np.exp([1.0, -0.5]))))
    assert np.isnan(rows["B"]["sensitivity"]["estimate"]) and rows["B"]["specificity"]["estimate"] == 0.5


def test_paired_difference_of_macro_auroc() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (80, 2)).astype(float)
    good = _outputs(y, y * 2 + rng.normal(0, 1, y.shape), names=("a", "b"))
    noise = _outputs(y, rng.normal(0, 1, y.shape), names=("a", "b"))
    same = paired_difference(good, good, n_boot=100)
    assert same.estimate == same.low == same.high == 0.0
    diff = paired_difference(good, noise, n_boot=300)
    assert diff.low > 0 and diff.estimate == pytest.approx(
        np.mean(
            [roc_auc_score(y[:, c], good.logits[:, c]) - roc_auc_score(y[:, c], noise.logits[:, c]) for c in (0, 1)]
        )
    )
    with pytest.raises(ValueError, match="labels differ"):
        paired_difference(good, _outputs(1 - y, noise.logits, names=("a", "b")), n_boot=10)


def test_temperature_scaling_fixes_overconfidence_and_lowers_ece() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 2, (3000, 2))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    logits = 3.0 * z  # overconfident by a factor of three
    t = fit_temperature(logits, y)
    np.testing.assert_allclose(t, 3.0, rtol=0.15)
    out = _outputs(y, logits, names=("a", "b"))
    for c in (0, 1):
        assert ece(y[:, c], out.probabilities(t)[:, c]) < 0.5 * ece(y[:, c], out.probabilities()[:, c])


def test_federated_temperature_fit_equals_the_pooled_fit() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, (300, 3))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 2))).astype(float)
    y[rng.random(y.shape) < 0.1] = NAN  # not annotated: left out at every site
    sites = np.array_split(np.arange(300), 4)
    summed = sum(temperature_nll_stats(z[r], y[r]) for r in sites)
    np.testing.assert_allclose(summed, temperature_nll_stats(z, y))
    np.testing.assert_array_equal(fit_temperature_from_stats(summed), fit_temperature(z, y))
    assert fit_temperature(z, np.full_like(y, NAN)).tolist() == [1.0, 1.0, 1.0]


def test_slice_auroc_counts_hematoma_slices_only() -> None:
    labels = np.array([[1], [0], [1], [0], [0], [0]], float)
    scores = np.array([[0.9], [0.2], [0.6], [0.7], [0.0], [0.1]])
    holds = np.array([True, True, True, True, False, False])
    assert slice_auroc_on_hematoma(labels, scores, holds, ["m"])["m"] == pytest.approx(
        roc_auc_score(labels[:4, 0], scores[:4, 0])
    )


def test_study_outputs_round_trip_json() -> None:
    out = concat_outputs([_outputs([0, NAN], [0.5, -1]), _outputs([1], [2])], strata=["0", "1"])
    back = StudyOutputs.from_dict(out.to_dict())
    np.testing.assert_array_equal(back.labels, out.labels)
    assert back.stratum.tolist() == ["0", "0", "1"] and back.names == out.names


def test_dice_interval_is_the_mean_per_study_dice_resampled_by_patient() -> None:
    counts = np.array([[8, 2, 2], [0, 0, 0], [1, 3, 0], [5, 0, 5]])  # Dice 0.8, 1 (nothing to find), 0.4, 2/3
    ci = dice_interval(counts, np.array(["a", "a", "b", "c"]), n_boot=200)
    assert ci.estimate == pytest.approx(np.mean([0.8, 1.0, 0.4, 2 / 3]))
    assert 0.4 <= ci.low <= ci.estimate <= ci.high <= 1.0


def test_summarise_only_computes_the_metrics_asked_for():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(30, 1)).astype(float)
    keys = np.asarray([f"k{i}" for i in range(30)])
    o = StudyOutputs(("m",), keys, keys, np.full(30, "s"), y, rng.normal(size=(30, 1)) + y, np.zeros(30, bool))
    (full,) = summarise(o, n_boot=20)
    (part,) = summarise(o, n_boot=20, only=("auroc", "sensitivity"))
    assert {"auroc", "sensitivity"} <= set(part) and not {"auprc", "brier", "ece", "specificity"} & set(part)
    assert part["auroc"] == full["auroc"] and part["sensitivity"] == full["sensitivity"]
