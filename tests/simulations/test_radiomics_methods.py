"""The radiomics baseline as a method of the harness (``simulations.radiomics_methods``): the
experiment file's ``scope`` and ``unet_from``, the in-process fit and its L2 choice, a tiny
experiment end to end on the generated dataset (local and pooled), and the federated scope through
Flower's simulation engine (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.radiomics import StudyFeatures
from common.config import MARKERS
from common.radiomics import N_FEATURES
from common.study_metrics import auroc
from simulations.experiment import Method, parse_experiment
from simulations.radiomics_methods import fit_model
from simulations.report.studies import from_json
from simulations.simulate import main
from tests.helpers.experiments import TINY_WIDE_TEST

POOLED = '[[methods]]\nname = "pooled"\nkind = "pooled"\nrun_config = { "eval.test-rounds" = "last" }\n'
RADIOMICS = """
[[methods]]
name = "radiomics local"
kind = "radiomics"
scope = "local"
unet_from = "pooled"
[[methods]]
name = "radiomics pooled"
kind = "radiomics"
unet_from = "pooled"
run_config = { "radiomics.l2" = "0.01 1" }
"""


def experiment(methods: list[dict]) -> dict:
    return {"name": "x", "methods": methods}


def test_scope_and_unet_from_are_checked_where_the_experiment_is_read():
    pooled = {"name": "pooled", "kind": "pooled", "run_config": {"model.preset": "tiny"}}
    ok = {"name": "r", "kind": "radiomics", "scope": "federated", "unet_from": "pooled", "run_config": {"seed": 3}}
    exp = parse_experiment(experiment([pooled, ok]))
    radiomics = exp.methods[1]
    assert radiomics.scope == "federated" and radiomics.needs_engine and not exp.methods[0].needs_engine
    # a radiomics method reads its U-Net method's run config under its own (the same caches)
    rc = exp.method_run_config(radiomics)
    assert rc["model.preset"] == "tiny" and rc["seed"] == 3
    assert Method("d", "radiomics", unet_from="p").scope == "pooled"  # the default scope
    with pytest.raises(ValueError, match="scope must be one of"):
        Method("r", "radiomics", scope="global", unet_from="p")
    with pytest.raises(ValueError, match="needs unet_from"):
        Method("r", "radiomics")
    with pytest.raises(ValueError, match="scope and unet_from are for kind = 'radiomics'"):
        Method("p", "pooled", unet_from="x")
    with pytest.raises(ValueError, match="listed after it: move it up"):
        parse_experiment(experiment([ok, pooled]))
    with pytest.raises(ValueError, match="unet_from 'nope' is not a method listed before it"):
        parse_experiment(experiment([pooled, {**ok, "unet_from": "nope"}]))
    local = {"name": "local", "kind": "local"}
    with pytest.raises(ValueError, match="'local' is a local method; it must be one of kind"):
        parse_experiment(experiment([local, {**ok, "unet_from": "local"}]))


def features(n: int, seed: int) -> StudyFeatures:
    """Studies whose first feature decides every marker (the opposite for the second marker)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES))
    X[:, 5] = np.nan  # a feature undefined everywhere: imputed, never a NaN logit
    y = (X[:, 0] > 0).astype(float)
    labels = np.stack([y, 1 - y, y, y], axis=1)
    labels[:1, 2] = np.nan
    keys = np.asarray([f"s{seed}-{i}" for i in range(n)])
    return StudyFeatures(
        keys, keys, np.full(n, "site"), labels, X, np.zeros(n, bool), np.full((n, 3), np.nan), np.full((n, 2), np.nan)
    )


def test_the_in_process_fit_chooses_on_validation_and_calibrates():
    model = fit_model(features(80, 0), features(30, 1), (0.001, 0.1, 100.0), 0.0)
    test = features(40, 2)
    z = model.logits(test.features)
    assert not np.isnan(z).any()
    for c, m in enumerate(MARKERS):
        assert auroc(test.labels[:, c], z[:, c]) > 0.95, m
    assert set(model.l2) == set(MARKERS) and set(model.l2.values()) <= {0.001, 0.1, 100.0}
    assert set(model.meta["thresholds"]) == set(MARKERS) and model.meta["validation"]["score"] > 0.8  # binned
    assert fit_model(features(80, 0), features(0, 1), (0.1,), 0.0).meta == {}  # no validation: default operating point


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_root, one_torch_thread) -> Path:
    tmp = tmp_path_factory.mktemp("radiomics")
    exp = tmp / "exp.toml"
    exp.write_text(TINY_WIDE_TEST.format(seeds="[0]", methods=POOLED + RADIOMICS, extra_scenarios=""))
    argv = ["--experiment", str(exp), "--data", str(synthetic_root), "--out", str(tmp / "runs"), "--boot", "20"]
    assert main([*argv, "--threads", "1"]) == 0
    (out,) = (tmp / "runs").iterdir()
    return out


def test_local_and_pooled_radiomics_are_recorded_as_the_deep_methods_are(run):
    studies = from_json(json.loads((run / "studies.json").read_text()))
    by = {(e["method"], e["site"]): e for e in studies}
    sites = {site for method, site in by if method == "pooled"}
    assert sites and {site for method, site in by if method == "radiomics pooled"} == sites
    assert {site for method, site in by if method == "radiomics local"} == sites
    for site in sites:  # the same test studies and patients as the deep method's
        deep, rad = by[("pooled", site)]["outputs"], by[("radiomics pooled", site)]["outputs"]
        assert rad.studies.tolist() == deep.studies.tolist() and rad.patients.tolist() == deep.patients.tolist()
        assert rad.names == tuple(MARKERS) and np.array_equal(
            rad.labels, deep.labels[:, : len(MARKERS)], equal_nan=True
        )
        assert by[("radiomics pooled", site)]["thresholds"].shape == (len(MARKERS),)
    tables = json.loads((run / "study_metrics.json").read_text())["natural"]
    assert {r["method"] for r in tables["headline"]} == {"pooled", "radiomics local", "radiomics pooled"}
    assert ("pooled", "radiomics pooled") in {(p["a"], p["b"]) for p in tables["paired"]}
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    got = {(r["metric"], r["marker"]) for r in rows if r["method"] == "radiomics local"}
    assert {("auc_study", m) for m in MARKERS} | {("macro_auc_study", ""), ("n_studies", "")} <= got
    methods = json.loads((run / "metrics.json").read_text())["experiment"]["methods"]
    assert {"scope": "local", "unet_from": "pooled"}.items() <= methods[1].items()
    assert "radiomics pooled" in (run / "report.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_federated_radiomics_through_the_simulation_engine(tmp_path, synthetic_root, one_torch_thread):
    """The radiomics federation on Flower's simulation engine (one virtual SuperNode per site), its
    U-Net the pooled method's, saved as the run's init checkpoint; scored and recorded here."""
    federated = (
        '[[methods]]\nname = "radiomics fed"\nkind = "radiomics"\nscope = "federated"\nunet_from = "pooled"\n'
        'run_config = { "radiomics.rounds" = 2, "radiomics.l2" = "0.1 1" }\n'
    )
    exp = tmp_path / "exp.toml"
    exp.write_text(TINY_WIDE_TEST.format(seeds="[0]", methods=POOLED + federated, extra_scenarios=""))
    argv = ["--experiment", str(exp), "--data", str(synthetic_root), "--out", str(tmp_path / "runs"), "--boot", "20"]
    assert main([*argv, "--threads", "1"]) == 0
    (out,) = (tmp_path / "runs").iterdir()
    (run_dir,) = [p for p in (out / "federated").iterdir() if p.is_dir() and "radiomics" in p.name]
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["stage"] for r in history["rounds"]] == ["radiomics", "radiomics"]
    assert (run_dir / "radiomics.json").is_file() and list((out / "federated").glob("*.unet.pt"))
    studies = from_json(json.loads((out / "studies.json").read_text()))
    fed = {e["site"]: e for e in studies if e["method"] == "radiomics fed"}
    deep = {e["site"]: e for e in studies if e["method"] == "pooled"}
    assert set(fed) == set(deep)
    assert all(fed[s]["outputs"].studies.tolist() == deep[s]["outputs"].studies.tolist() for s in fed)
    cost = json.loads((out / "round_cost.json").read_text())["mean_over_seeds"]
    assert [(r["method"], r["stage"]) for r in cost] == [("radiomics fed", "radiomics")]
