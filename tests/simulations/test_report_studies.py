"""Study-level report tables from per-study outputs (no training: outputs made up here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import LABELS
from common.study_metrics import StudyOutputs, sensitivity_specificity, sigmoid
from simulations.report.studies import from_json, headline, paired, per_site, pooled, study_tables, to_json


def entry(method: str, seed: int, site: str, shift: float, threshold: float = 0.5, temperature: float = 1.0) -> dict:
    rng = np.random.default_rng(seed * 100 + int(site[-1]))
    n = 12
    y = rng.integers(0, 2, size=(n, len(LABELS))).astype(float)
    y[:2] = [1, 0, 1, 0, 1]
    y[2:4] = [0, 1, 0, 1, 0]
    z = 2 * y - 1 + rng.normal(0, 1.0, size=y.shape) + shift
    keys = np.asarray([f"{site}-study{i}" for i in range(n)])
    outputs = StudyOutputs(LABELS, keys, np.char.add("pat-", keys), np.full(n, site), y, z, np.zeros(n, bool))
    return {
        "scenario": "s",
        "method": method,
        "seed": seed,
        "site": site,
        "outputs": outputs,
        "temperature": np.full(len(LABELS), temperature),
        "thresholds": np.full(len(LABELS), threshold),
        "dice_counts": {k: (10, 2, 3) for k in keys[:3]},
    }


@pytest.fixture
def studies():
    # local: one model per site, each with its own threshold; pooled: one threshold everywhere
    return [entry("local", s, site, 0.3, th, 2.0) for s in (0, 1) for site, th in (("a1", 0.3), ("a2", 0.7))] + [
        entry("pooled", s, site, 0.0) for s in (0, 1) for site in ("a1", "a2")
    ]


def test_sensitivity_uses_each_models_own_threshold(studies):
    rows = {(r["method"], r["marker"]): r for r in headline(studies, "s", n_boot=20)}
    local = [e for e in studies if e["method"] == "local" and e["seed"] == 0]
    y = np.concatenate([e["outputs"].labels[:, 0] for e in local])
    hits = np.concatenate([sigmoid(e["outputs"].logits[:, 0] / 2.0) >= e["thresholds"][0] for e in local])
    sens0 = (hits & (y == 1)).sum() / (y == 1).sum()
    local1 = [e for e in studies if e["method"] == "local" and e["seed"] == 1]
    y1 = np.concatenate([e["outputs"].labels[:, 0] for e in local1])
    hits1 = np.concatenate([sigmoid(e["outputs"].logits[:, 0] / 2.0) >= e["thresholds"][0] for e in local1])
    sens1 = (hits1 & (y1 == 1)).sum() / (y1 == 1).sum()
    assert rows[("local", LABELS[0])]["sensitivity"]["estimate"] == pytest.approx((sens0 + sens1) / 2)
    # one threshold for all: the plain rule at 0.5
    pooled_out = pooled([e for e in studies if e["method"] == "pooled" and e["seed"] == 0], "calibrated")
    s0 = sensitivity_specificity(pooled_out.labels[:, 0], pooled_out.probabilities()[:, 0], 0.5)[0]
    assert rows[("pooled", "macro")]["auroc"]["low"] <= rows[("pooled", "macro")]["auroc"]["high"]
    assert "expansion" not in {m for _, m in rows}  # markers and macro only
    assert rows[("pooled", LABELS[0])]["n"] == 48 and 0 <= s0 <= 1  # 2 sites x 12 studies x 2 seeds
    assert rows[("local", LABELS[0])]["ece_raw"]["estimate"] != rows[("local", LABELS[0])]["ece"]["estimate"]


def test_paired_per_site_and_json_round_trip(studies):
    (p,) = paired(studies, "s", n_boot=20)
    assert (p["a"], p["b"]) == ("local", "pooled") and p["difference"]["n_boot"] > 0
    sites = per_site(studies, "s", n_boot=20)
    dice = [r for r in sites if r["marker"] == "dice"]
    assert {(r["method"], r["site"]) for r in dice} == {(m, s) for m in ("local", "pooled") for s in ("a1", "a2")}
    assert all(r["n"] == 6 and r["dice"]["estimate"] == pytest.approx(20 / 25) for r in dice)
    macro = [r for r in sites if r["marker"] == "macro"]
    assert all(r["markers"][LABELS[0]]["n"] == 24 for r in macro)
    back = from_json(json.loads(json.dumps(to_json(studies))))
    assert json.dumps(study_tables(back, 20)) == json.dumps(study_tables(studies, 20))  # NaN-safe comparison


def test_planned_comparison_is_one_markers_auroc_difference_mean_over_seeds(studies, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    from simulations.experiment import Comparison
    from simulations.report.studies import main, planned

    marker = LABELS[1]
    (row,) = planned(studies, "s", [Comparison("local", "pooled", marker)], n_boot=50)
    col = LABELS.index(marker)

    def auc(method, seed):  # on the calibrated logits (divided by the validation temperature)
        es = [e for e in studies if e["method"] == method and e["seed"] == seed]
        y = np.concatenate([e["outputs"].labels[:, col] for e in es])
        z = np.concatenate([e["outputs"].logits[:, col] / e["temperature"][col] for e in es])
        return roc_auc_score(y, z)

    expected = np.mean([auc("local", s) - auc("pooled", s) for s in (0, 1)])
    assert row["difference"]["estimate"] == pytest.approx(expected)
    assert row["difference"]["low"] <= expected <= row["difference"]["high"]
    y = np.concatenate([e["outputs"].labels[:, col] for e in studies if e["method"] == "pooled"])
    assert (row["marker"], row["n"], row["n_pos"]) == (marker, 48, int(y.sum()))
    assert study_tables(studies, 20, comparisons=[Comparison("local", "pooled", marker)])["s"]["planned"][0]["n"] == 48
    # the command-line view of an existing run: its studies.json and an experiment's comparisons
    (tmp_path / "studies.json").write_text(json.dumps(to_json(studies)))
    exp = tmp_path / "exp.toml"
    exp.write_text(
        'name = "x"\n[[methods]]\nname = "local"\nkind = "local"\n[[methods]]\nname = "pooled"\nkind = "pooled"\n'
        f'[[comparisons]]\na = "local"\nb = "pooled"\nmarker = "{marker}"\n'
    )
    main([str(tmp_path), "--experiment", str(exp), "--boot", "50"])
    out = capsys.readouterr().out
    assert f"| local | pooled | {marker} | 48 ({int(y.sum())}) | {row['difference']['estimate']:.3f} [" in out


def test_a_comparison_must_name_known_methods_and_a_marker():
    from simulations.experiment import parse_experiment

    doc = {"methods": [{"name": "a", "kind": "local"}, {"name": "b", "kind": "pooled"}]}
    with pytest.raises(ValueError, match="names a method that is not in"):
        parse_experiment({**doc, "comparisons": [{"a": "a", "b": "c", "marker": "hypodensity"}]}, "x.toml")
    with pytest.raises(ValueError, match="marker must be one of"):
        parse_experiment({**doc, "comparisons": [{"a": "a", "b": "b", "marker": "size"}]}, "x.toml")
    assert parse_experiment({**doc, "comparisons": [{"a": "a", "b": "b", "marker": "hypodensity"}]}).comparisons
