"""``simulations/simulate.py`` end to end: a tiny experiment through Flower's simulation engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.report.tables import mean_sd
from simulations.simulate import main
from tests.helpers.data import write_site
from tests.helpers.experiments import BASELINES, TINY

REPO = Path(__file__).resolve().parents[2]
SITES = ("site-01", "site-02", "site-03")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("simulate") / "data"
    for i, site in enumerate(SITES):
        write_site(
            root / site,
            n_studies=5,
            shape=(3, 40, 40),
            seed=10 * i,
            labels=[[str((i + k) % 2), str(k % 2), "0", str((k + 1) % 2), ""] for k in range(5)],
        )
    return root


def _experiment(tmp_path: Path, seeds: str, methods: str, extra_scenarios: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(TINY.format(seeds=seeds, methods=methods, extra_scenarios=extra_scenarios))
    return path


def _run(tmp_path: Path, exp: Path, data: Path) -> Path:
    assert main(["--experiment", str(exp), "--data", str(data), "--out", str(tmp_path / "runs"), "--boot", "50"]) == 0
    (out,) = (tmp_path / "runs").iterdir()
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_experiment_through_the_simulation_engine(tmp_path, data, capsys, monkeypatch):
    """The baselines and a federation through Flower's simulation engine; the federation with the
    federated GAN stage (design i: one GAN round before stage 2, its generator then augmenting stage 2)."""
    gan = '"gan.augment-ratio" = 0.5, "rounds.gan" = 1, "gan.local-steps" = 1, "gan.steps" = 2'
    methods = BASELINES + f'\n[[methods]]\nname = "fedavg"\nkind = "federated"\nrun_config = {{ {gan} }}\n'
    monkeypatch.chdir(tmp_path)  # relative --out, as a user types it
    assert main(["--experiment", str(_experiment(tmp_path, "[0]", methods)), "--data", str(data), "--out", "runs"]) == 0
    (out,) = (tmp_path / "runs").iterdir()
    printed = capsys.readouterr().out
    assert "[ROUND 3/3]" in printed and "report:" in printed  # Flower's rounds shown as progress
    doc = json.loads((out / "metrics.json").read_text())
    rows = doc["rows"]
    assert set(rows[0]) == {"scenario", "method", "seed", "site", "marker", "metric", "value"}
    for method in ("local", "pooled", "fedavg"):
        for site in SITES:  # every method has per-site figures at every site
            got = {(r["metric"], r["marker"]) for r in rows if r["method"] == method and r["site"] == site}
            assert {("dice", ""), ("macro_auc_slice", ""), ("auc_slice", "hypodensity")} <= got, (method, site)
    # the federated curve has one point per round that trains the joint model, from the ServerApp's history
    history = json.loads(next((out / "federated").glob("*/history.json")).read_text())
    assert [r["stage"] for r in history["rounds"]] == [1, "gan", 2]
    assert [c["round"] for c in doc["curves"] if c["method"] == "fedavg"] == [1, 3]
    assert set(history["rounds"][0]["evaluate"]["sites"]) == set(SITES)
    gan_round = history["rounds"][1]  # G and D went out to and came back from every site
    assert set(gan_round["bytes"]) == set(SITES) and not gan_round.get("failures")
    assert all(b["sent"] > 0 and b["received"] > 0 for b in gan_round["bytes"].values())
    # the report's round cost: one row per stage of the federation, the GAN round's bytes as in its history
    cost = json.loads((out / "round_cost.json").read_text())["mean_over_seeds"]
    assert [(r["method"], r["stage"], r["rounds"]) for r in cost] == [
        ("fedavg", "1", 1),
        ("fedavg", "gan", 1),
        ("fedavg", "2", 1),
    ]
    assert cost[1]["sent"] == pytest.approx(np.mean([b["sent"] for b in gan_round["bytes"].values()]))
    # the GAN figures measure the global generator every site sampled from (design i), at each site
    quality = json.loads((out / "gan_quality.json").read_text())["sites"]
    assert {r["site"] for r in quality if r["method"] == "fedavg"} == set(SITES)
    # the headline is the mean over sites of the long table (computed here independently)
    for s in doc["summary"]:
        dice = [r["value"] for r in rows if r["method"] == s["method"] and r["metric"] == "dice" and r["marker"] == ""]
        assert s["dice"] == pytest.approx(float(np.mean(dice)))
    page = (out / "report.html").read_text()
    assert all(site in page for site in SITES) and "synthetic" not in page.split("<h2>")[0].lower()
    assert page.count("data:image/png;base64,") >= 5
    assert (out / "metrics.csv").read_text().splitlines()[0] == "scenario,method,seed,site,marker,metric,value"
    assert {"summary.csv", "curves.csv", "experiment.toml"} <= {p.name for p in out.iterdir()}
    assert doc["environment"]["versions"]["flwr"] == "1.42.0"


@pytest.mark.timeout(300)
def test_seeds_give_mean_and_spread_and_leave_one_out_scores_only_the_held_out_site(tmp_path, data):
    loso = '\n[[scenarios]]\nname = "loso"\nsplit = "natural"\nleave_out = "site-02"\n'
    out = _run(tmp_path, _experiment(tmp_path, "[0, 1]", BASELINES, loso), data)
    doc = json.loads((out / "metrics.json").read_text())
    rows = doc["rows"]
    assert {r["seed"] for r in rows} == {0, 1}
    pooled = [s for s in doc["summary"] if s["scenario"] == "natural" and s["method"] == "pooled"][0]
    per_seed = [
        np.mean(
            [
                r["value"]
                for r in rows
                if r["scenario"] == "natural"
                and r["method"] == "pooled"
                and r["seed"] == seed
                and r["metric"] == "dice"
            ]
        )
        for seed in (0, 1)
    ]
    assert (pooled["dice"], pooled["dice_sd"]) == pytest.approx(mean_sd(per_seed)[:2])
    assert pooled["seeds"] == 2
    held = [r for r in rows if r["scenario"] == "loso/without-site-02"]
    assert held and {r["site"] for r in held} == {"site-02"}
    assert {r["method"] for r in held} == {"local", "local (best site)", "pooled"}
    assert [s["site"] for s in doc["sites"]["loso/without-site-02"]] == ["site-01", "site-03"]
    # "local (best site)": the local model with the best score on its own validation patients, per seed
    for seed in (0, 1):
        picks = [p for p in doc["selections"] if p["seed"] == seed and p["scenario"] == "loso/without-site-02"]
        assert sorted(p["model"] for p in picks) == ["site-01", "site-03"]
        (chosen,) = [p for p in picks if p["chosen"]]
        assert chosen["validation_score"] == max(p["validation_score"] for p in picks)
    # per-study test outputs of every method and seed, pseudonymous keys only
    studies = json.loads((out / "studies.json").read_text())
    assert {(e["method"], e["seed"]) for e in studies if e["scenario"] == "natural"} == {
        (m, s) for m in ("local", "pooled") for s in (0, 1)
    }
    text = (out / "studies.json").read_text()
    assert not any(f"P{i:03d}" in text or f"S{i:03d}" in text for i in range(5))
    tables = json.loads((out / "study_metrics.json").read_text())["natural"]
    assert {r["method"] for r in tables["headline"]} == {"local", "pooled"}
    assert [(p["a"], p["b"]) for p in tables["paired"]] == [("local", "pooled")]
    assert {r["site"] for r in tables["per_site"]} == set(SITES)


def test_command_line_errors(tmp_path, capsys):
    assert main(["--experiment", "no-such-experiment"]) == 2
    assert "no such experiment file; bundled experiments: [" in capsys.readouterr().err
    exp = _experiment(tmp_path, "[0]", BASELINES)
    assert main(["--experiment", str(exp), "--data", str(tmp_path / "missing")]) == 2
    assert "data folder does not exist" in capsys.readouterr().err


def test_runs_as_a_script_from_any_folder(tmp_path):
    """``python simulations/simulate.py --help`` imports the project, not the folder's own modules."""
    done = subprocess.run(
        [sys.executable, str(REPO / "simulations" / "simulate.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "--experiment" in done.stdout


def test_paper_style_methods_and_the_paper_table(tmp_path, data):
    """The random slice split, location fine-tuning and a [paper] table (as the paper_* experiments use)."""
    methods = """
[[methods]]
name = "random split"
kind = "pooled"
split_by = "slice"
[[methods]]
name = "location"
kind = "location-finetune"
finetune_steps = 2
[paper]
note = "test"
rows = [ { label = "random", method = "random split", metric = "dice", paper = 0.86 },
         { label = "putamen", method = "location: fine-tuned", metric = "dice", site = "location:putamen", paper = 0.89 } ]
"""
    out = _run(tmp_path, _experiment(tmp_path, "[0]", methods), data)
    doc = json.loads((out / "metrics.json").read_text())
    rows = doc["rows"]
    # write_site puts every study at "putamen": one location, Dice before and after fine-tuning
    tuned = [r for r in rows if r["method"] == "location: fine-tuned" and r["metric"] == "dice"]
    before = [r for r in rows if r["method"] == "location: all locations" and r["metric"] == "dice"]
    assert [r["site"] for r in tuned] == [r["site"] for r in before] == ["location:putamen"]
    random_dice = [r["value"] for r in rows if r["method"] == "random split" and r["metric"] == "dice"]
    assert len(random_dice) == len(SITES)
    paper = {p["label"]: p for p in doc["paper"]}
    assert paper["random"]["paper"] == 0.86 and paper["random"]["ours"] == pytest.approx(float(np.mean(random_dice)))
    assert paper["putamen"]["ours"] == pytest.approx(tuned[0]["value"])
    page = (out / "report.html").read_text()
    assert "Beside the source paper" in page and "synthetic" not in page.split("<h2>")[0].lower()


@pytest.mark.timeout(300)
def test_results_flag_writes_the_headline_with_intervals_and_the_readme_block(tmp_path, data, capsys):
    from simulations.report.files import README_END, README_START

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nrest\n")
    results = tmp_path / "results" / "headline.md"
    exp = _experiment(tmp_path, "[0]", BASELINES)
    args = ["--experiment", str(exp), "--data", str(data), "--out", str(tmp_path / "runs"), "--boot", "50"]
    assert main([*args, "--results", str(results), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    assert "study-level AUROC [95 % CI]" in printed
    table = results.read_text()
    assert "| local | macro |" in table and "| pooled | hypodensity |" in table
    assert "| local | pooled |" in table  # the paired difference
    doc = readme.read_text()
    assert "old table" not in doc and table in doc and doc.startswith("intro\n") and doc.endswith("rest\n")
    readme.write_text("no block\n")
    assert main([*args, "--results", str(results), "--readme", str(readme)]) == 2
    assert "no results block" in capsys.readouterr().err


def test_eval_test_rounds_last_scores_only_the_rounds_that_count(tmp_path, data, monkeypatch):
    """``eval.test-rounds = last``: the baselines score no stage-1 round of a two-stage run (no
    curve point there), and still score the chosen round on the test patients, once: the final
    scoring reuses the last round's test pass (every dataset, validation or test, is evaluated once)."""
    import simulations.runner as runner

    calls: list[int] = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda model, ds, *a, **k: calls.append(id(ds)) or real(model, ds, *a, **k))
    text = TINY.format(seeds="[0]", methods=BASELINES, extra_scenarios="")
    text = text.replace("rounds_stage1 = 1", "rounds_stage1 = 2").replace(
        '"model.image-size" = 32', '"model.image-size" = 32\n"eval.test-rounds" = "last"'
    )
    (tmp_path / "exp.toml").write_text(text)
    doc = json.loads((_run(tmp_path, tmp_path / "exp.toml", data) / "metrics.json").read_text())
    assert {(c["method"], c["round"]) for c in doc["curves"]} == {("local", 3), ("pooled", 3)}
    assert {r["method"] for r in doc["rows"] if r["metric"] == "dice"} == {"local", "pooled"}
    # each site's validation and test set once per method (local, pooled): twice in all
    assert len(set(calls)) == 2 * len(SITES) and all(calls.count(c) == 2 for c in calls)


@pytest.fixture(scope="module")
def expansion_data(tmp_path_factory) -> Path:
    """Three sites whose expansion labels differ by site (so the pooled test split holds both
    classes) and whose hypodensity labels hold both classes (so a GAN trains)."""
    root = tmp_path_factory.mktemp("simulate-expansion") / "data"
    for i, site in enumerate(SITES):
        labels = [[str((i + k) % 2), str(k % 2), "0", str((k + 1) % 2), str(i % 2)] for k in range(5)]
        write_site(root / site, n_studies=5, shape=(3, 40, 40), seed=10 * i, labels=labels)
    return root


@pytest.mark.timeout(300)
def test_expansion_head_and_sngan_write_their_report_sections(tmp_path, expansion_data):
    from sklearn.metrics import roc_auc_score

    methods = (
        '[[methods]]\nname = "pooled"\nkind = "pooled"\nrun_config = { "model.predict-expansion" = true, '
        '"gan.augment-ratio" = 0.5, "gan.steps" = 2 }\n'
    )
    out = _run(tmp_path, _experiment(tmp_path, "[0]", methods), expansion_data)
    (row,) = json.loads((out / "expansion.json").read_text())["scenarios"]["natural"]
    # the head's C-statistic from the per-study test outputs, computed here independently
    entries = [e["outputs"] for e in json.loads((out / "studies.json").read_text())]  # one per test site
    c = entries[0]["names"].index("expansion")
    y = np.asarray([r[c] for e in entries for r in e["labels"]], float)
    z = np.asarray([r[c] for e in entries for r in e["logits"]], float)
    known = ~np.isnan(y)
    assert row["n"] == known.sum() == 3 and row["n_pos"] == y[known].sum() == 1  # one test patient per site
    assert row["head"]["estimate"] == pytest.approx(roc_auc_score(y[known], z[known]))
    for score in ("volume", "marker_score", "head_minus_volume", "head_minus_marker_score"):
        assert row[score]["estimate"] is not None, score
    assert row["n_train"] == 9 and row["n_train_positive"] == 3  # site-02's three training patients
    (site,) = json.loads((out / "gan_quality.json").read_text())["sites"]
    assert site["site"] == "pooled" and site["frechet"] >= 0 and site["memorisation"] > 0
    page = (out / "report.html").read_text()
    assert "Expansion prediction (study level)" in page and "SNGAN augmentation" in page
    assert "natural_gan_grid.png" in page
