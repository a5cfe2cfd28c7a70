"""The report's ceiling section (``simulations.report.ceiling_section``) on a generated dataset
run end to end by ``simulate.py`` (local and pooled, tiny budget): the runner's study keys map to
the truth, every figure equals one computed here independently (scikit-learn on labels.csv and the
truth file), seeds are strata, and nothing written names a study or a patient."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.config import LABELS, MARKERS
from common.study_metrics import StudyOutputs
from simulations.report.ceiling_section import (
    CEILING_FILE,
    ceiling_tables,
    console,
    method_ceiling_rows,
    read_ceiling,
    write_ceiling,
)
from simulations.report.studies import from_json
from simulations.simulate import main
from simulations.synthetic.ceiling import (
    ceiling_table,
    pseudonym_map,
    read_labels,
    score_against_truth,
    truth_keys,
)
from simulations.synthetic.truth import read_truth
from tests.helpers.experiments import BASELINES, TINY_WIDE_TEST


def test_rows_from_a_written_out_truth():
    """Eight baselines and a follow-up (left out) of one site model, every label incl. expansion."""
    sev = np.array([0.0, 0.1, 0.0, 0.5, 0.7, 0.2, 0.9, 0.3])
    readers = np.array([0, 0, 1, 1, 1, 0, 1, 0], float)
    true = (sev > 0.25).astype(float)
    prob = np.array([0.1, 0.3, 0.6, 0.5, 0.8, 0.2, 0.7, 0.4])  # what the readers saw (a mimic in study 2)
    truth = {("s", f"p{i}", f"b{i}"): {"kind": "baseline", "expansion_risk": str(sev[i])} for i in range(8)}
    for i, row in enumerate(truth.values()):
        row |= {f"{m}_severity": str(sev[i]) for m in MARKERS} | {f"{n}_true": str(int(true[i])) for n in LABELS}
        row |= {f"{m}_label_probability": str(prob[i]) for m in MARKERS}
    truth[("s", "p0", "f0")] = {"kind": "followup"}
    keys = list(truth)
    z = np.array([-1.0, 0.7, -0.4, -0.2, -0.2, 0.4, 0.7, -1.0])  # exact ties count half
    logits = np.tile(np.r_[z, 3.0][:, None], (1, len(LABELS)))
    labels = np.tile(np.r_[readers, np.nan][:, None], (1, len(LABELS)))
    outputs = StudyOutputs(
        LABELS,
        np.asarray([f"cache/{k[2]}" for k in keys]),
        np.asarray([k[1] for k in keys]),
        np.full(9, "s"),
        labels,
        logits,
        np.zeros(9, bool),
    )
    entry = {"seed": 0, "outputs": outputs, "temperature": np.full(5, 2.0), "thresholds": np.full(5, 0.5)}
    rows = method_ceiling_rows([entry], truth, {k[2]: k for k in keys}, n_boot=50)
    assert [r["label"] for r in rows] == list(LABELS)  # expansion too: the model predicts it
    assert roc_auc_score(readers, prob) == 1.0 > roc_auc_score(readers, sev)
    for r in rows:
        assert (r["n"], r["reader_pos"], r["true_pos"], r["n_truth"]) == (8, 4, int(true.sum()), 8)
        # The upper bound is the evidence observer (expansion: the true risk); the truth observer beside it.
        ceiling = roc_auc_score(readers, sev if r["label"] == "expansion" else prob)
        assert r["ceiling"] == pytest.approx(ceiling)
        assert r["truth_observer"] == pytest.approx(roc_auc_score(readers, sev))
        assert r["auroc"]["estimate"] == pytest.approx(roc_auc_score(readers, z))
        assert r["fraction"]["estimate"] == pytest.approx(roc_auc_score(readers, z) / ceiling)
        assert r["vs_truth"]["estimate"] == pytest.approx(roc_auc_score(true, z))
        assert r["vs_truth"]["low"] <= r["vs_truth"]["estimate"] <= r["vs_truth"]["high"]


#: The tests below share one generated dataset and one tiny simulate.py run (about 80 s on 2 busy cores).
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory, synthetic_root, one_torch_thread) -> Path:
    tmp = tmp_path_factory.mktemp("ceiling")
    exp = tmp / "exp.toml"
    exp.write_text(TINY_WIDE_TEST.format(seeds="[0]", methods=BASELINES, extra_scenarios=""))
    argv = ["--experiment", str(exp), "--data", str(synthetic_root), "--out", str(tmp / "runs"), "--boot", "40"]
    assert main([*argv, "--threads", "1"]) == 0
    (out,) = (tmp / "runs").iterdir()
    return out


@pytest.fixture(scope="module")
def studies(report) -> list[dict]:
    return from_json(json.loads((report / "studies.json").read_text()))


def _same(a: float | None, b: float) -> bool:
    a = np.nan if a is None else a
    return (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def _baseline_keys(entries: list[dict], root: Path) -> tuple[list, np.ndarray, np.ndarray]:
    """Truth keys, reader labels and logits of the baselines among the entries' studies."""
    truth, by = read_truth(root), pseudonym_map(root)
    keys, labels, logits = [], [], []
    for e in entries:
        o = e["outputs"]
        for k, y, z in zip(truth_keys(o.studies, by), o.labels, o.logits):
            if truth[k]["kind"] == "baseline":
                keys.append(k), labels.append(y), logits.append(z)
    return keys, np.asarray(labels), np.asarray(logits)


@SLOW
def test_the_runners_study_keys_map_to_the_truth(studies, synthetic_root):
    labels = read_labels(synthetic_root)
    by = pseudonym_map(synthetic_root)
    for e in studies:
        o = e["outputs"]
        keys = truth_keys(o.studies, by)
        assert {k[0] for k in keys} == {e["site"]}  # natural sites: the evaluation site is the source site
        for k, y in zip(keys, o.labels):
            written = [float(labels[k][m]) if labels[k][m] != "" else np.nan for m in o.names]
            np.testing.assert_array_equal(y, written)
    with pytest.raises(KeyError, match="S-000000000000 is not a study of the data root"):
        truth_keys(["site-01-x/S-000000000000"], by)


@SLOW
def test_every_figure_equals_an_independent_computation(report, studies, synthetic_root):
    doc = read_ceiling(report)
    assert set(doc) == {"natural"} and {r["method"] for r in doc["natural"]} == {"local", "pooled"}
    rows = {r["label"]: r for r in doc["natural"] if r["method"] == "pooled"}
    assert list(rows) == list(MARKERS)  # no expansion output: no expansion row
    keys, y, z = _baseline_keys([e for e in studies if e["method"] == "pooled"], synthetic_root)
    expected = ceiling_table(synthetic_root, keys)
    vs_truth = score_against_truth(synthetic_root, keys, {m: z[:, c] for c, m in enumerate(MARKERS)})
    defined = 0
    for c, m in enumerate(MARKERS):
        r, known = rows[m], ~np.isnan(y[:, c])
        both = len(set(y[known, c])) == 2
        auc = roc_auc_score(y[known, c], z[known, c]) if both else np.nan  # one temperature: same ranks
        assert (r["n"], r["reader_pos"], r["true_pos"]) == (
            expected[m]["n"],
            expected[m]["positives"],
            expected[m]["true_positives"],
        )
        assert _same(r["ceiling"], expected[m]["ceiling"]), m
        assert _same(r["truth_observer"], expected[m]["truth_observer"]), m
        assert _same(r["auroc"]["estimate"], auc), m
        assert _same(r["fraction"]["estimate"], auc / expected[m]["ceiling"]), m
        assert _same(r["vs_truth"]["estimate"], vs_truth[m]), m
        if both:
            defined += 1
            assert r["auroc"]["low"] <= r["auroc"]["estimate"] <= r["auroc"]["high"]
            assert 0.5 < r["ceiling"] <= 1.0
    assert defined >= 2  # the test split holds both classes of most markers


@SLOW
def test_seeds_are_strata_of_the_ceiling(studies, synthetic_root):
    """Sites 1-2 as one seed and site 3 as another: each figure is the mean of the two seeds'."""
    pooled = [e for e in studies if e["method"] == "pooled"]
    two = [{**e, "seed": 0 if e["site"] != "site-03" else 1} for e in pooled]
    rows = {r["label"]: r for r in ceiling_tables(synthetic_root, two, n_boot=0)["natural"]}
    parts = [[e for e in two if e["seed"] == s] for s in (0, 1)]
    tables = [ceiling_table(synthetic_root, _baseline_keys(p, synthetic_root)[0]) for p in parts]
    for m in MARKERS:
        per_seed = [t[m]["ceiling"] for t in tables if not np.isnan(t[m]["ceiling"])]
        assert _same(rows[m]["ceiling"], float(np.mean(per_seed)) if per_seed else np.nan), m
        assert rows[m]["n"] == sum(t[m]["n"] for t in tables)


@SLOW
def test_the_section_in_the_report_names_no_study_or_patient(report, studies, synthetic_root, tmp_path, capsys):
    page = (report / "report.html").read_text()
    assert "<h2>Ceiling</h2>" in page and "AUROC vs truth" in page and "ceiling.png" in page
    assert (report / "figures" / "natural_ceiling.png").is_file()
    written = (report / CEILING_FILE).read_text() + re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    ids = set()
    for site in sorted(synthetic_root.glob("site-*")):
        with (site / "labels.csv").open() as f:
            ids |= {v for r in csv.DictReader(f) for v in (r["patient_id"], r["study_id"])}
    names = {str(k).rsplit("/", 1)[-1] for e in studies for k in e["outputs"].studies}
    assert ids and names and not [i for i in ids | names if i in written]
    text = console(read_ceiling(report)["natural"], "natural")
    assert all(m in text for m in MARKERS) and "ceiling" in text
    # Without a truth (any other data) there is no section and no file; without its key, a note.
    assert write_ceiling(tmp_path, tmp_path, studies, tmp_path, 10) is None
    assert write_ceiling(tmp_path, None, studies, tmp_path, 10) is None
    assert not (tmp_path / CEILING_FILE).exists()
    keyless = tmp_path / "keyless"
    (keyless / ".truth").mkdir(parents=True)
    (keyless / ".truth" / "truth.csv").write_text((synthetic_root / ".truth" / "truth.csv").read_text())
    (note,) = write_ceiling(tmp_path, keyless, studies, tmp_path, 10).blocks
    assert (
        note.note and "No ceiling: FileNotFoundError" in note.text and ".pseudonym-key: no pseudonym key" in note.text
    )
    assert not (keyless / ".cache").exists() and not (tmp_path / CEILING_FILE).exists()
