"""The learning-curve benchmark's table and figure from a run's validation curve (no training here:
``simulations.runner.validation_curve`` rows are built by hand)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.bench_learning_curve import curve_table, markdown, plot
from simulations.experiment import load_experiment
from simulations.runner import validation_curve


def test_table_counts_crops_and_averages_seeds(tmp_path) -> None:
    exp = load_experiment("learning_curve")
    exp = replace(exp, budget=replace(exp.budget, rounds_stage1=4, local_steps_stage2=40, batch_size_stage2=32))
    rows = [
        {"method": "m", "seed": s, "round": r, "stage": 2, "score": 0.5 + 0.1 * (r - 4) + 0.02 * s, "seconds": 10.0 * r}
        for s in (0, 1)
        for r in (5, 6)
    ] + [{"method": "m", "seed": 0, "round": 4, "stage": 1, "score": 0.7, "seconds": 1.0}]
    table = curve_table(rows, exp, n_sites=12)
    assert [r["stage2_round"] for r in table] == [1, 2]  # stage-1 rounds are not on the curve
    assert table[0]["presentations"] == 40 * 32 * 12 and table[1]["presentations"] == 2 * 40 * 32 * 12
    assert table[0]["score"] == pytest.approx(0.61) and table[1]["seeds"] == 2
    text = markdown(table, "python -m benchmarks.bench_learning_curve", "abc")
    assert "| m | 2 | 30,720 | 60 | 0.710 |" in text and "commit abc" in text
    assert plot(table, tmp_path / "curve.png").stat().st_size > 5000


def test_federated_history_gives_the_validation_score_and_the_seconds_so_far() -> None:
    history = {
        "rounds": [
            {"round": 1, "stage": 1, "seconds": 5.0, "evaluate": {}},
            {"round": 2, "stage": 2, "seconds": 3.0, "evaluate": {"validation": {"score": 0.6}}},
            {"round": 3, "stage": 2, "seconds": 4.0, "evaluate": {"validation": {"score": 0.65}}},
        ]
    }
    rows = validation_curve(history, method="f", seed=0)
    assert [(r["round"], r["score"], r["seconds"]) for r in rows] == [(2, 0.6, 8.0), (3, 0.65, 12.0)]
