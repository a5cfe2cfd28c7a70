"""The synthetic benchmark is as hard as intended, and measurably so (issue 12): severities and
mimics at their configured rates, reader agreement at the published AC1, a ceiling below 1 only
when readers are noisy, expansion driven by the markers at the configured odds ratios, enough
test positives, and a ground truth that no site folder or cache ever holds."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull
from sklearn.linear_model import LogisticRegression

from common.config import MARKERS
from common.study_metrics import auroc
from simulations.synthetic import default_profiles, generate_dataset
from simulations.synthetic.anatomy import HeadPose, ScanGrid, make_head, sample_anatomy
from simulations.synthetic.ceiling import (
    ceiling_table,
    fraction_of_ceiling,
    pseudonym_map,
    score_against_truth,
)
from simulations.synthetic.cohort import (
    EXPANSION_OR,
    EXPANSION_RATE,
    ONSET_OR_PER_HOUR,
    REFERENCE_ONSET_H,
    REFERENCE_VOLUME_ML,
    VOLUME_OR_PER_DOUBLING,
    draw_patient,
    expansion_intercept,
    expansion_logit,
    plan_site,
)
from simulations.synthetic.hematoma import at_severity, make_hematoma, sample_hematoma_spec
from simulations.synthetic.mimics import MIMIC_RATES, MIMICS, STRENGTH_RANGE, mimic_evidence
from simulations.synthetic.profiles import DEFAULT_STUDIES_SCALE, MARKER_PREVALENCE, scale_studies
from simulations.synthetic.readers import (
    READER_AC1,
    adjudicate,
    gwet_ac1,
    label_probability,
    reader_calls,
    reader_params,
    study_evidence,
)
from simulations.synthetic.study import render_study
from simulations.synthetic.truth import TRUTH_DIR, read_truth, truth_path

N_DRAWS = 20_000
SEV_RANGE = (0.05, 1.0)


@pytest.fixture(scope="module")
def cohort():
    """A large fresh draw of the default pooled cohort (not the one the calibrations used)."""
    rng = np.random.default_rng(2024)
    loc = tuple(np.mean([p.location_mix for p in default_profiles(12)], axis=0))
    prev = tuple(MARKER_PREVALENCE[m] for m in MARKERS)
    return [draw_patient(rng, prev, loc, SEV_RANGE, 1.0) for _ in range(N_DRAWS)]


def _within(observed: float, expected: float, n: int, z: float = 4.0) -> bool:
    """A rate within z binomial standard errors of its expectation."""
    return abs(observed - expected) <= z * np.sqrt(max(expected * (1 - expected), 1e-9) / n)


def _readers(cohort, marker: str, noise: float = 1.0, tendency: float = 0.0, seed: int = 5):
    """Two independent readers' calls on the cohort, with their evidence and the truth."""
    rng = np.random.default_rng([seed, MARKERS.index(marker)])
    truth = np.array([p.markers[marker] for p in cohort])
    sev = np.array([p.severity[marker] for p in cohort])
    ev = np.array(
        [study_evidence(t, s, mimic_evidence(p.mimics, marker), noise) for t, s, p in zip(truth, sev, cohort)]
    )
    thr, tau = reader_params(marker, noise, tendency)
    a, b = (reader_calls(ev, rng.random(len(ev)), thr, tau) for _ in range(2))
    return truth, sev, a, b


# ---------------------------------------------------------------- severities and mimics


def test_markers_severities_and_mimics_at_their_configured_rates(cohort):
    n = len(cohort)
    for m in MARKERS:
        present = np.array([p.markers[m] for p in cohort])
        sev = np.array([p.severity[m] for p in cohort])
        assert _within(present.mean(), MARKER_PREVALENCE[m], n), (m, present.mean())
        assert np.all(sev[~present] == 0) and np.all((sev[present] >= SEV_RANGE[0]) & (sev[present] <= SEV_RANGE[1]))
        subtle = (sev[present] < 0.3).mean()  # uniform severities: a quarter are subtle
        assert _within(subtle, (0.3 - SEV_RANGE[0]) / (SEV_RANGE[1] - SEV_RANGE[0]), int(present.sum())), (m, subtle)
    for scale in (0.5, 1.5):
        rng = np.random.default_rng(int(scale * 10))
        draws = [draw_patient(rng, (0.3,) * 4, (0.2,) * 5, SEV_RANGE, scale) for _ in range(5000)]
        for k in MIMICS:
            s = np.array([d.mimics[k] for d in draws])
            assert _within((s > 0).mean(), min(1.0, MIMIC_RATES[k] * scale), len(s)), (k, scale, (s > 0).mean())
            assert np.all((s[s > 0] >= STRENGTH_RANGE[0]) & (s[s > 0] <= STRENGTH_RANGE[1]))
        # Mimics are drawn independently of the markers: as common in negatives as in positives.
        neg = np.array([not d.markers["hypodensity"] for d in draws])
        edema = np.array([d.mimics["edema"] > 0 for d in draws])
        assert abs(edema[neg].mean() - edema[~neg].mean()) < 0.05


def _solidity(m2: np.ndarray) -> float:
    pts = np.argwhere(m2).astype(float)
    corners = np.concatenate([pts + d for d in ([0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5])])
    return len(pts) / ConvexHull(corners).volume


def _render(seed: int, markers, severity=None, mimics=None, location: str = "putamen", n: int = 96):
    rng = np.random.default_rng(seed)
    anat = sample_anatomy(rng)
    ps = 230.0 / n
    grid = ScanGrid((28, n, n), ps, 5.0, (-(n - 1) / 2 * ps, -(n - 1) / 2 * ps, -45.0))
    pose = HeadPose((0.0, 0.0, 0.0), 0.0)
    head = make_head(anat, grid, pose)
    spec = sample_hematoma_spec(rng, location, markers, anat, severity, 30.0, mimics)
    delta, mask, info = make_hematoma(spec, grid, pose, head, rng)
    return head.hu + delta, mask, info


def test_severity_sets_how_conspicuous_a_marker_is():
    for s in range(3):
        depth = {}
        for sev in (0.0, 1.0):
            hu, m, info = _render(500 + s, {"hypodensity": True}, {"hypodensity": sev})
            assert info["markers"]["hypodensity"]
            inner = ndimage.binary_erosion(m, np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
            depth[sev] = (np.median(hu[m]) - hu[inner].min(), info["island_voxels"])
            # The island is exactly the configured HU difference below the clot median.
            assert depth[sev][0] == pytest.approx(at_severity("island_delta_hu", sev), abs=3.0)
        assert depth[0.0][1] < depth[1.0][1]  # subtle islands are smaller too
    sol = {0.0: [], 1.0: []}
    for s in range(4):
        for sev in sol:
            _, m, info = _render(600 + s, {"irregular_margin": True}, {"irregular_margin": sev}, location="subcortical")
            sol[sev].append(_solidity(m[info["slices"]["largest"]]))
    assert np.mean(sol[0.0]) > np.mean(sol[1.0]) + 0.03, sol
    for mk, key in (("blend_sign", "blend_delta_hu"), ("fluid_level", "fluid_serum_delta_hu")):
        spread = {}
        for sev in (0.0, 1.0):
            hu, m, info = _render(700, {mk: True}, {mk: sev})
            k = info["slices"][mk if mk == "blend_sign" else "largest"]
            v = hu[k][m[k]]
            spread[sev] = np.percentile(v, 95) - np.percentile(v, 5)
        gap = at_severity(key, 1.0) - at_severity(key, 0.0)
        assert spread[1.0] - spread[0.0] > 0.5 * gap, (mk, spread)


def _with_mimics(mimics: dict[str, float]):
    prof = replace(default_profiles(1, 3, 96)[0], noise_sigma_hu=2.0, n_patients=4)
    st = next(s for s in plan_site(prof, 1, 3).studies if not s.is_followup)
    st = replace(st, truth=replace(st.truth, mimics={k: mimics.get(k, 0.0) for k in MIMICS}))
    return render_study(prof, st)


def test_mimics_change_the_image_not_the_hematoma():
    base = _with_mimics({})
    image_level = _with_mimics({"streak": 1.0, "ivh": 1.0, "calcification": 1.0, "secondary_bleed": 1.0})
    assert np.array_equal(base.true_mask, image_level.true_mask)  # not part of the annotated bleed
    diff = image_level.hu - base.hu
    outside = ~base.true_mask
    assert (diff[outside] > 30).sum() > 20  # layered ventricular blood, second bleed, calcification
    assert (image_level.hu[outside] - base.hu[outside] > 80).any()  # calcified foci
    assert (diff[base.true_mask] < -8).sum() > 5  # a dark streak across the clot
    edema = _with_mimics({"edema": 1.0})
    rim = ndimage.binary_dilation(base.true_mask, iterations=2) & ~base.true_mask
    assert edema.hu[rim].mean() < base.hu[rim].mean() - 2  # a darker rim, outside the mask


# ---------------------------------------------------------------- readers and the ceiling


def test_reader_agreement_matches_published_ac1(cohort):
    for m in MARKERS:
        truth, sev, a, b = _readers(cohort, m)
        assert gwet_ac1(a, b) == pytest.approx(READER_AC1[m], abs=0.03), m
        # Strict and lenient sites (the per-site tendency) call the same studies differently.
        _, _, strict, _ = _readers(cohort, m, tendency=+0.08)
        _, _, lenient, _ = _readers(cohort, m, tendency=-0.08)
        assert lenient.mean() > strict.mean() + 0.02
        # Without reader noise the call is the truth.
        _, _, exact, exact2 = _readers(cohort, m, noise=0.0)
        assert np.array_equal(exact, truth) and np.array_equal(exact2, truth)
    calls = [np.array([0, 1, 1, 0]), np.array([0, 1, 0, 1])]
    assert adjudicate(calls, np.array([1, 0, 1, 0])).tolist() == [0, 1, 1, 0]


def test_ceiling_is_one_without_reader_noise_and_below_with_it(cohort):
    for m in MARKERS:
        truth, sev, a, _ = _readers(cohort, m)
        assert 0.6 < auroc(a, sev) < 0.95, m
        _, _, exact, _ = _readers(cohort, m, noise=0.0)
        assert auroc(exact, sev) == 1.0
    assert fraction_of_ceiling(0.7, 0.875) == pytest.approx(0.8)


def test_the_evidence_observer_is_the_upper_bound_and_a_model_given_the_evidence_reaches_it(cohort):
    """Labels from sites with strict and lenient readers (one reader, or two and an adjudicator): the
    evidence observer (``label_probability``, the report's ceiling) beats the true-severity observer,
    because readers also call mimics; a logistic regression fitted on half the studies to what a
    reader saw (the evidence and the site) reaches the ceiling on the other half."""
    rng = np.random.default_rng(7)
    sites = rng.integers(0, 4, len(cohort))
    tendency, n_readers = np.array([-0.08, 0.0, 0.05, 0.1]), np.array([1, 1, 2, 2])
    half = np.arange(len(cohort)) % 2 == 0
    for m in MARKERS:
        truth = np.array([p.markers[m] for p in cohort])
        sev = np.array([p.severity[m] for p in cohort])
        ev = np.array([study_evidence(t, s, mimic_evidence(p.mimics, m), 1.0) for t, s, p in zip(truth, sev, cohort)])
        labels, prob = np.zeros(len(cohort), int), np.zeros(len(cohort))
        for k in range(4):
            on = sites == k
            thr, tau = reader_params(m, 1.0, tendency[k])
            calls = [reader_calls(ev[on], rng.random(on.sum()), thr, tau) for _ in range(3)]
            labels[on] = adjudicate(calls[: n_readers[k]], calls[2])
            prob[on] = label_probability(ev[on], thr, tau, int(n_readers[k]))
        ceiling, observer = auroc(labels, prob), auroc(labels, sev)
        assert ceiling > observer + 0.02, (m, ceiling, observer)
        x = np.column_stack([ev, np.eye(4)[sites], ev[:, None] * np.eye(4)[sites]])
        fit = LogisticRegression(C=100.0, max_iter=2000).fit(x[half], labels[half])
        model = auroc(labels[~half], fit.decision_function(x[~half]))
        assert model == pytest.approx(auroc(labels[~half], prob[~half]), abs=0.01), m
        assert model > auroc(labels[~half], sev[~half]) + 0.02, m


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("noiseless")
    overrides = {"reader_noise": 0.0, "missing_label_rate": 0.0}
    generate_dataset(
        out, n_sites=1, seed=11, matrix=64, studies_scale=0.5, progress=False, workers=1, profile_overrides=overrides
    )
    return out


def test_ceiling_table_on_written_data(noiseless):
    table = ceiling_table(noiseless)
    truth = read_truth(noiseless)
    baselines = [k for k, r in truth.items() if r["kind"] == "baseline"]
    for m in MARKERS:
        row = table[m]
        assert row["n"] == len(baselines) and row["positives"] == row["true_positives"]
        assert row["ceiling"] == 1.0 or (np.isnan(row["ceiling"]) and row["positives"] in (0, row["n"]))
    assert 0.0 <= table["expansion"]["positives"] <= table["expansion"]["n"]
    # A model that outputs the true severity scores 1 against the truth; a constant 0.5. Follow-ups
    # (no markers) among the keys are left out, as in a test split.
    everything = list(truth)
    scores = {m: [float(truth[k][f"{m}_severity"] or 0) for k in everything] for m in MARKERS}
    perfect = score_against_truth(noiseless, everything, scores)
    assert all(v == 1.0 or np.isnan(v) for v in perfect.values())
    flat = score_against_truth(noiseless, baselines, {m: [0.0] * len(baselines) for m in MARKERS})
    assert all(v == 0.5 or np.isnan(v) for v in flat.values())


# ---------------------------------------------------------------- expansion


def test_expansion_follows_the_markers_at_the_configured_odds_ratios(cohort):
    rng = np.random.default_rng(77)
    b0 = expansion_intercept()
    x = np.array(
        [
            [float(p.markers[m]) for m in MARKERS]
            + [np.log2(p.volume_ml / REFERENCE_VOLUME_ML), p.onset_hours - REFERENCE_ONSET_H]
            for p in cohort
        ]
    )
    risk = np.array([1 / (1 + np.exp(-expansion_logit(p.markers, p.volume_ml, p.onset_hours, b0))) for p in cohort])
    y = rng.random(len(risk)) < risk
    assert abs(y.mean() - EXPANSION_RATE) < 0.015
    fit = LogisticRegression(C=1e6, max_iter=2000).fit(x, y)
    expected = [np.log(EXPANSION_OR[m]) for m in MARKERS] + [np.log(VOLUME_OR_PER_DOUBLING), np.log(ONSET_OR_PER_HOUR)]
    assert np.allclose(fit.coef_[0], expected, atol=0.15), (fit.coef_[0], expected)
    count = x[:, : len(MARKERS)].sum(axis=1)
    rates = [y[count == k].mean() for k in range(3)] + [y[count >= 3].mean()]
    assert all(a < b for a, b in zip(rates, rates[1:])), rates


def test_default_dataset_has_enough_positives_in_a_20_percent_test_split():
    """From the plans alone (nothing rendered): reader-positive labels per marker and expansion
    positives that a pooled 20 % test split of the default dataset holds on average."""
    positives = dict.fromkeys((*MARKERS, "expansion"), 0.0)
    profiles = [scale_studies(p, DEFAULT_STUDIES_SCALE) for p in default_profiles(12, 0, 96)]
    for i, prof in enumerate(profiles, start=1):
        for st in plan_site(prof, i, 0).studies:
            if st.is_followup:
                continue
            for j, m in enumerate(MARKERS):
                ev = study_evidence(st.markers[m], st.truth.severity[m], mimic_evidence(st.truth.mimics, m), 1.0)
                thr, tau = reader_params(m, prof.reader_noise, prof.reader_tendency)
                call = reader_calls(np.array([ev]), np.array([st.reader_uniforms[0][j]]), thr, tau)[0]
                positives[m] += 0.2 * float(call and m not in st.missing_labels)
            if st.partner_study_id and "expansion" not in st.missing_labels:
                positives["expansion"] += 0.2 * st.expands
    assert all(positives[m] >= 30 for m in MARKERS), positives
    assert positives["expansion"] >= 20, positives
    sizes = [p.n_patients for p in profiles]
    assert max(sizes) >= 4 * min(sizes)


# ---------------------------------------------------------------- the truth stays out of the sites


def test_truth_is_outside_every_site_folder_and_cache(noiseless, tmp_path):
    from client.data.cache import build_site_cache, inputs_key
    from client.ingest.layouts import list_site_folders
    from common.config import PreprocessConfig

    tp = truth_path(noiseless)
    assert tp.parent == noiseless / TRUTH_DIR and tp.is_file()
    sites = list_site_folders(noiseless)
    assert [s.name for s in sites] == ["site-01"]
    for site in sites:
        assert not any("truth" in p.name for p in site.rglob("*"))
        with (site / "labels.csv").open() as f:
            header = next(csv.reader(f))
        assert not any("severity" in c or "true" in c or "reader" in c for c in header)
        truth_keys = {(k[1], k[2]) for k in read_truth(noiseless) if k[0] == site.name}
        with (site / "labels.csv").open() as f:
            assert {(r["patient_id"], r["study_id"]) for r in csv.DictReader(f)} == truth_keys
    site = sites[0]
    cfg = PreprocessConfig(size=32)
    key = inputs_key(site, cfg)
    tp.write_text(tp.read_text() + "\n")  # the truth changes: no site input changes
    assert inputs_key(site, cfg) == key
    cache, _ = build_site_cache(site, tmp_path / "cache", cfg)
    index = json.loads((Path(cache.path) / "index.json").read_text())
    text = json.dumps(index)
    assert "severity" not in text and "mimic" not in text and "reader" not in text
    assert not any(TRUTH_DIR in str(p) for p in (tmp_path / "cache").rglob("*"))
    # The report maps cache pseudonyms to the truth with the caches' own key, and never makes one.
    with pytest.raises(FileNotFoundError, match="no pseudonym key"):
        pseudonym_map(noiseless)
    assert not (noiseless / ".cache").exists()
    assert {s["study"] for s in index["studies"]} <= set(pseudonym_map(noiseless, tmp_path / "cache"))
    assert inputs_key(site, cfg) == key
