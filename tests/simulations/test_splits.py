"""Splits of a dataset into sites, virtual caches, leave-one-site-out, scanner shift, experiment files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from client.data.cache import build_site_cache, open_cache
from client.data.dataset import SliceDataset
from common.config import MARKERS, PreprocessConfig
from simulations.experiment import EXPERIMENTS_DIR, Scenario, load_experiment, parse_experiment
from simulations.runner import make_cases
from simulations.splits import (
    MIN_PATIENTS_PER_SITE,
    AcquisitionShift,
    degrade,
    dirichlet_plans,
    iid_plans,
    natural_plans,
    patient_class,
    pool_patients,
    quantity_plans,
    site_column_plans,
)
from simulations.virtual import plan_cache
from tests.helpers.data import write_site

PRE = PreprocessConfig(size=32)
FRACTIONS = (0.6, 0.2, 0.2)


def _labels(i: int) -> list[str]:
    """Varied marker patterns so that label skew has classes to skew."""
    patterns = [["1", "0", "0", "0", ""], ["0", "1", "0", "0", ""], ["0", "0", "1", "0", ""], ["0", "0", "0", "0", ""]]
    return patterns[i % len(patterns)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    caches = []
    for s in range(3):
        site = write_site(
            root / "data" / f"site-{s + 1:02d}",
            n_studies=8,
            shape=(3, 36, 36),
            seed=20 * s,
            labels=[_labels(i + s) for i in range(8)],
        )
        text = site.joinpath("labels.csv").read_text().splitlines()
        # a pooled dataset's `site` column: studies 0-3 from "north", 4-6 "south", study 7 unknown
        rows = [text[0] + ",site"] + [
            r + "," + ("north" if i < 4 else "south" if i < 7 else "") for i, r in enumerate(text[1:])
        ]
        site.joinpath("labels.csv").write_text("\n".join(rows) + "\n")
        caches.append(build_site_cache(site, root / "cache", PRE)[0])
    return {"caches": caches, "root": root}


def _patients_of(plan, caches) -> set[tuple[int, str]]:
    return {(s, caches[s].studies[i]["patient"]) for s, i in plan.studies}


def _assert_partition(plans, caches):
    """Every patient in exactly one site, studies of a patient together, no study twice."""
    seen = Counter(st for p in plans for st in p.studies)
    assert set(seen.values()) == {1}
    assert sum(seen.values()) == sum(len(c.studies) for c in caches)
    owners = Counter(pt for p in plans for pt in _patients_of(p, caches))
    assert set(owners.values()) == {1}


def test_natural_and_site_column(sources):
    caches = sources["caches"]
    natural = natural_plans(caches)
    assert [p.site_id for p in natural] == ["site-01", "site-02", "site-03"]
    _assert_partition(natural, caches)
    plans, problems = site_column_plans(caches)
    assert [p.site_id for p in plans] == ["north", "south"]
    assert [len(p.studies) for p in plans] == [12, 9]
    assert len(problems) == 3 and "1 study without a value in labels.csv's site column" in problems[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda c: iid_plans(c, 4, seed=3),
        lambda c: dirichlet_plans(c, 4, 0.2, seed=3),
        lambda c: quantity_plans(c, 4, 0.5, seed=3),
    ],
    ids=["iid", "dirichlet", "quantity"],
)
def test_pooled_splits_deal_whole_patients(sources, make):
    caches = sources["caches"]
    plans = make(caches)
    _assert_partition(plans, caches)
    assert all(len(_patients_of(p, caches)) >= MIN_PATIENTS_PER_SITE for p in plans)
    assert make(caches) == plans  # seeded


def test_dirichlet_small_alpha_skews_labels_more_than_iid(sources):
    caches = sources["caches"]
    patients = {p.key: p.label_class for p in pool_patients(caches)}

    def skew(plans) -> float:
        """Mean over sites of the largest class share."""
        shares = []
        for p in plans:
            counts = Counter(patients[pt] for pt in _patients_of(p, caches))
            shares.append(max(counts.values()) / sum(counts.values()))
        return float(np.mean(shares))

    skewed = np.mean([skew(dirichlet_plans(caches, 2, 0.05, seed=s)) for s in range(8)])
    iid = np.mean([skew(iid_plans(caches, 2, seed=s)) for s in range(8)])
    assert skewed > iid + 0.1


def test_patient_class():
    assert patient_class([None, None, None, None, None]) == "unlabelled"
    assert patient_class([0.0, 1.0, 1.0, 0.0, None]) == MARKERS[1]
    assert patient_class([0.0, 0.0, 0.0, 0.0, 1.0]) == "none"


def test_too_few_patients_for_the_sites_is_an_error(sources):
    with pytest.raises(ValueError, match="24 patients cannot make 12 sites of at least 3"):
        iid_plans(sources["caches"], 12, seed=0)


def test_degrade_in_grey_levels():
    rng = np.random.default_rng(0)
    img = np.zeros((2, 32, 32), np.uint8)
    img[:, 8:24, 8:24] = rng.integers(60, 180, size=(2, 16, 16))
    assert degrade(img, AcquisitionShift(), (0, 80), 0) is img
    shifted = degrade(img, AcquisitionShift(offset_hu=8.0), (0, 80), 0).astype(int)
    inside = img > 0
    np.testing.assert_array_equal(
        shifted[inside], np.clip(np.rint(img[inside] + 8 * 255 / 80), 0, 255)
    )  # 8 HU = 25.5 grey
    assert np.all(shifted[~inside] == 0)  # stripped background stays air
    noisy = degrade(img, AcquisitionShift(noise_hu=10.0), (0, 80), 1).astype(float) - img
    assert noisy[inside].std() == pytest.approx(10 * 255 / 80, rel=0.1)
    low = degrade(img, AcquisitionShift(resolution=0.5), (0, 80), 0).astype(float)
    assert np.abs(np.diff(low, axis=2)).mean() < np.abs(np.diff(img.astype(float), axis=2)).mean()


def test_virtual_cache_holds_the_plan(sources, tmp_path):
    caches = sources["caches"]
    plan = iid_plans(caches, 4, seed=1)[0]
    shifted = type(plan)(plan.site_id, plan.studies, AcquisitionShift(offset_hu=4.0))
    cache = plan_cache(shifted, caches, tmp_path)
    assert cache.index["site_id"] == plan.site_id and len(cache.studies) == len(plan.studies)
    for entry, (s, i) in zip(cache.studies, plan.studies):
        src = caches[s].studies[i]
        assert entry["patient"] == src["patient"] and entry["labels"] == src["labels"]
        got = np.asarray(cache.images[entry["start"] : entry["stop"]])
        want = degrade(np.asarray(caches[s].images[src["start"] : src["stop"]]), shifted.shift, (0.0, 80.0), 0)
        assert np.array_equal(got > 0, want > 0)
        np.testing.assert_array_equal(
            cache.masks[entry["start"] : entry["stop"]], caches[s].masks[src["start"] : src["stop"]]
        )
    assert plan_cache(shifted, caches, tmp_path).path == cache.path  # reused, not rewritten
    assert plan_cache(natural_plans(caches)[1], caches, tmp_path).path == caches[1].path  # whole source: in place
    assert open_cache(cache.path).n_slices == cache.n_slices


def _patients(ds: SliceDataset) -> set[tuple[str, str]]:
    """(source site, pseudonym): the test sites reuse patient ids under one pseudonym key."""
    studies = [ds.cache.studies[k] for k in ds.cache.slice_study()[ds.indices]]
    return {(s.get("source", ds.cache.index["site_id"]), s["patient"]) for s in studies}


def test_cases_are_patient_disjoint_inside_every_site(sources, tmp_path):
    caches = sources["caches"]
    for scenario in (Scenario(split="natural"), Scenario(split="dirichlet", n_sites=4, alpha=0.3, shift=0.5)):
        (case,) = make_cases(scenario, caches, seed=2, fractions=FRACTIONS, work=tmp_path, log=lambda s: None)
        for train, ev in zip(case.train, case.evaluate):
            assert len(train) and len(ev.data)
            assert not _patients(train) & _patients(ev.data)


def test_leave_one_site_out_never_trains_on_the_held_out_site(sources, tmp_path):
    caches = sources["caches"]
    cases = make_cases(
        Scenario(split="natural", leave_out="all"),
        caches,
        seed=0,
        fractions=FRACTIONS,
        work=tmp_path,
        log=lambda s: None,
    )
    assert [c.held_out for c in cases] == ["site-01", "site-02", "site-03"]
    for case in cases:
        assert case.held_out not in [p.site_id for p in case.plans]
        held = [c for c in caches if c.index["site_id"] == case.held_out][0]
        assert all(ds.cache.path != held.path for ds in case.train)
        (ev,) = case.evaluate
        assert ev.site_id == case.held_out and ev.data.cache.path == held.path
        assert len(_patients(ev.data)) == len({s["patient"] for s in held.studies})  # all its patients
    with pytest.raises(ValueError, match="leave_out \\['site-09'\\] is not a site"):
        make_cases(Scenario(split="natural", leave_out="site-09"), caches, 0, FRACTIONS, tmp_path, lambda s: None)


def test_bundled_experiments_parse():
    names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))
    assert {
        "default",
        "covariate_shift",
        "robustness",
        "leave_one_site_out",
        "paper_split_preprocessing",
        "paper_location_finetune",
        "paper_classifier_loss",
        "paper_masked_input",
    } <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.methods and exp.seeds
        for row in exp.paper.get("rows", []):
            assert row["method"] in {m.name for m in exp.methods} or row["method"].split(":")[0] in {
                m.name for m in exp.methods
            }


def test_privacy_patient_methods_are_valid_runs_of_the_same_length():
    """Every method of the DP experiment parses as a run config (its keys and values), all run 8 rounds,
    and the stage-2-only ones plan no stage 1."""
    from common.run_config import parse_run_config
    from tests.helpers.flower import run_config

    runs = [(e, m) for e in map(load_experiment, ("privacy_patient", "privacy_patient_ablations")) for m in e.methods]
    for exp, method in runs:
        rounds = parse_run_config(run_config(**exp.method_run_config(method))).rounds
        assert rounds.stage1 + rounds.stage2 == 8, method.name
        assert (rounds.stage1 == 0) == ("stage 2 only" in method.name), method.name


def test_update_faults_and_secure_updates_are_refused_together():
    """The site masks its update inside the train handler, before the simulation's fault mod: an experiment
    pairing the two fails when read; a label-flip fault (on the training data) or a plain method is fine."""
    secure = {"name": "sa", "kind": "federated", "run_config": {"privacy.secure-updates": True}}
    scaled = {"name": "attack", "bad_sites": 1, "fault": {"kind": "scale", "factor": 10.0}}
    with pytest.raises(ValueError, match=r"x.toml: scenario\(s\) \['attack'\] have sites that corrupt .* \['sa'\]"):
        parse_experiment({"methods": [secure], "scenarios": [scaled]}, "x.toml")
    flipped = {"name": "flip", "bad_sites": 1, "fault": {"kind": "label-flip"}}
    parse_experiment({"methods": [secure], "scenarios": [flipped]})
    parse_experiment({"methods": [{"name": "plain", "kind": "federated"}], "scenarios": [scaled]})


def test_experiment_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such experiment file; bundled experiments"):
        load_experiment("nope")
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['sedes'\\]"):
        parse_experiment({"sedes": [0], "methods": [{"name": "a", "kind": "local"}]}, "x.toml")
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_experiment({"methods": [{"name": "a", "kind": "central"}]})
    with pytest.raises(ValueError, match="a federated method always splits by patient"):
        parse_experiment({"methods": [{"name": "a", "kind": "federated", "split_by": "slice"}]})
    with pytest.raises(ValueError, match="bad_sites = 1 needs a fault table"):
        parse_experiment({"methods": [{"name": "a", "kind": "local"}], "scenarios": [{"bad_sites": 1}]})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_experiment(bad)
