"""The report's expansion section: the head's study C-statistic beside volume alone and the
marker-count score, per seed then averaged, with patient-bootstrap intervals and paired differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.config import MARKERS
from common.study_metrics import StudyOutputs
from simulations.report.expansion_section import expansion_tables, write_expansion
from simulations.report.html import section_parts

NAMES = (*MARKERS, "expansion")


def _entry(seed: int, studies, patients, y, head, method="pooled", temperature=1.0) -> dict:
    """One method's test outputs at one seed: only the expansion column is filled."""
    n = len(studies)
    labels = np.full((n, len(NAMES)), np.nan)
    labels[:, -1] = y
    logits = np.zeros((n, len(NAMES)))
    logits[:, -1] = head
    outputs = StudyOutputs(
        NAMES, np.asarray(studies), np.asarray(patients), np.full(n, "site-01"), labels, logits, np.zeros(n, bool)
    )
    temp = np.ones(len(NAMES))
    temp[-1] = temperature
    return {
        "scenario": "natural",
        "method": method,
        "seed": seed,
        "site": "site-01",
        "outputs": outputs,
        "temperature": temp,
        "thresholds": np.full(len(NAMES), 0.5),
        "dice_counts": {},
    }


def _record(seed: int, studies, y, volume, marker) -> dict:
    return {
        "scenario": "natural",
        "seed": seed,
        "studies": np.asarray(studies),
        "expansion": np.asarray(y, int),
        "volume": np.asarray(volume, float),
        "marker_score": np.asarray(marker, float),
        "n_train": 20,
        "n_train_positive": 6,
    }


def _seed_data(rng: np.random.Generator, n: int, seed: int):
    y = np.r_[np.ones(n // 3), np.zeros(n - n // 3)].astype(int)
    rng.shuffle(y)
    studies = [f"cache-{seed}/S{i}" for i in range(n)]
    head = y + rng.normal(0, 1.0, n)
    volume = y * 0.2 + rng.normal(0, 1.0, n)
    marker = 0.5 * y + rng.normal(0, 1.0, n)
    return studies, y, head, volume, marker


def test_three_scores_match_a_hand_computation_per_seed_then_averaged():
    rng = np.random.default_rng(0)
    entries, records, expected = [], [], {"head": [], "volume": [], "marker_score": []}
    for seed, temperature in ((0, 1.0), (1, 2.5)):  # a temperature does not change a ranking
        studies, y, head, volume, marker = _seed_data(rng, 30, seed)
        patients = [f"p{seed}-{i}" for i in range(30)]
        # an extra test study without a reference hematoma (no comparator) and one unlabelled: both left out
        extra_y = np.r_[y, 1, np.nan]
        keys = [*studies, "x/1", studies[0] + "-nolabel"]
        entries.append(_entry(seed, keys, [*patients, "q", "r"], extra_y, np.r_[head, 9, 9], temperature=temperature))
        records.append(_record(seed, [*studies, studies[0] + "-nolabel"], np.r_[y, 0], np.r_[volume, 1], [*marker, 1]))
        for name, score in (("head", head), ("volume", volume), ("marker_score", marker)):
            expected[name].append(roc_auc_score(y, score))
    (row,) = expansion_tables(entries, records, n_boot=0)["natural"]
    assert row["method"] == "pooled" and row["n"] == 60 and row["n_pos"] == 20 and row["seeds"] == [0, 1]
    assert row["n_patients"] == 60 and row["n_train"] == 40 and row["n_train_positive"] == 12
    for name in ("head", "volume", "marker_score"):
        assert row[name]["estimate"] == pytest.approx(np.mean(expected[name]))
    assert row["head_minus_volume"]["estimate"] == pytest.approx(
        np.mean(expected["head"]) - np.mean(expected["volume"])
    )
    assert row["head_minus_marker_score"]["estimate"] == pytest.approx(
        np.mean(expected["head"]) - np.mean(expected["marker_score"])
    )


def test_interval_contains_the_estimate_and_narrows_with_more_patients():
    widths = {}
    for n in (40, 400):
        studies, y, head, volume, marker = _seed_data(np.random.default_rng(1), n, 0)
        entries = [_entry(0, studies, [f"p{i}" for i in range(n)], y, head)]
        (row,) = expansion_tables(entries, [_record(0, studies, y, volume, marker)], n_boot=300)["natural"]
        for name in ("head", "volume", "marker_score", "head_minus_volume", "head_minus_marker_score"):
            iv = row[name]
            assert iv["low"] <= iv["estimate"] <= iv["high"] and iv["n_boot"] == 300, (n, name)
        widths[n] = row["head"]["high"] - row["head"]["low"]
    assert widths[400] < 0.6 * widths[40]


def test_a_seed_without_a_fitted_marker_score_drops_out_of_that_score_only():
    rng = np.random.default_rng(2)
    entries, records = [], []
    for seed in (0, 1):
        studies, y, head, volume, marker = _seed_data(rng, 12, seed)
        entries.append(_entry(seed, studies, [f"p{seed}-{i}" for i in range(12)], y, head))
        records.append(_record(seed, studies, y, volume, marker if seed == 0 else np.full(12, np.nan)))
    (row,) = expansion_tables(entries, records, n_boot=0)["natural"]
    assert row["marker_score"]["estimate"] == pytest.approx(
        roc_auc_score(records[0]["expansion"], records[0]["marker_score"])
    )
    heads = [roc_auc_score(r["expansion"], e["outputs"].logits[:, -1]) for e, r in zip(entries, records)]
    assert row["head"]["estimate"] == pytest.approx(np.mean(heads))


def test_written_only_for_a_method_with_the_head(tmp_path):
    studies, y, head, volume, marker = _seed_data(np.random.default_rng(3), 12, 0)
    no_head = _entry(0, studies, [f"p{i}" for i in range(12)], y, head, method="plain")
    no_head["outputs"] = StudyOutputs(
        MARKERS,
        no_head["outputs"].studies,
        no_head["outputs"].patients,
        no_head["outputs"].sites,
        no_head["outputs"].labels[:, :4],
        no_head["outputs"].logits[:, :4],
        no_head["outputs"].fallback,
    )
    record = _record(0, studies, y, volume, marker)
    assert write_expansion(tmp_path, [no_head], [record], n_boot=10) is None
    assert not (tmp_path / "expansion.json").exists()
    with_head = _entry(0, studies, [f"p{i}" for i in range(12)], y, head, method="pooled")
    section = write_expansion(tmp_path, [no_head, with_head], [record], n_boot=10)
    doc = json.loads((tmp_path / "expansion.json").read_text())
    assert [r["method"] for r in doc["scenarios"]["natural"]] == ["pooled"]
    assert doc["scenarios"]["natural"][0]["head"]["estimate"] == pytest.approx(roc_auc_score(y, head))
    page = "".join(section_parts(section))
    assert "Expansion prediction" in page and "marker-count score" in page and f"{roc_auc_score(y, head):.3f}" in page
