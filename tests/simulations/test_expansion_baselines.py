"""The expansion head's comparators: volume alone and the marker-count score (fitted on train only)."""

from __future__ import annotations

import numpy as np
import pytest

from common.study_metrics import auroc
from simulations.expansion_baselines import StudyTable, compare_expansion, fit_marker_score


def _table(volume, count, expansion) -> StudyTable:
    n = len(volume)
    return StudyTable(
        np.asarray([f"s{i}" for i in range(n)]),
        np.asarray(volume, float),
        np.asarray(count, float),
        np.asarray(expansion, int),
    )


def test_marker_score_learns_the_counts_on_train_and_volume_scores_alone():
    train = _table([10, 12, 30, 11, 29, 31], [0, 0, 0, 2, 3, 2], [0, 0, 0, 1, 1, 1])
    test = _table([10, 40, 20, 5], [3, 0, 2, 0], [1, 0, 1, 0])
    out = compare_expansion(train, test, model_auc=0.7)
    assert out["marker_score"] == 1.0  # the counts separate expansion, the fitted weight says so
    # volume alone ranks the 40 ml non-expander highest: pairs (pos, neg) won = (10>5), (20>5) of 4
    assert out["volume"] == pytest.approx(auroc([1, 0, 1, 0], [10, 40, 20, 5])) == 0.5
    assert out["model"] == 0.7 and out["n_test"] == 4 and out["n_test_positive"] == 2 and out["n_train"] == 6


def test_single_class_training_split_gives_no_score():
    train = _table([10, 12], [1, 0], [0, 0])
    assert fit_marker_score(train) is None
    out = compare_expansion(train, _table([1, 2], [0, 1], [0, 1]), model_auc=float("nan"))
    assert np.isnan(out["marker_score"]) and out["volume"] == 1.0


def test_comparator_scores_are_volume_and_the_score_fitted_on_train_alone():
    from sklearn.linear_model import LogisticRegression

    from simulations.expansion_baselines import comparator_scores

    train = _table([10, 12, 30, 11, 29, 31], [0, 0, 0, 2, 3, 2], [0, 0, 0, 1, 1, 1])
    test = _table([10, 40, 20, 5], [3, 0, 2, 0], [1, 0, 1, 0])
    by_hand = LogisticRegression().fit(np.stack([train.marker_count, train.volume_ml], 1), train.expansion)
    got = comparator_scores(train, test)
    assert np.array_equal(got["volume"], test.volume_ml)
    assert got["marker_score"] == pytest.approx(
        by_hand.predict_proba(np.stack([test.marker_count, test.volume_ml], 1))[:, 1]
    )
    assert np.isnan(comparator_scores(_table([1, 2], [0, 1], [0, 0]), test)["marker_score"]).all()
