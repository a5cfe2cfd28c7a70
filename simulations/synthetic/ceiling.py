"""The ceiling of a generated dataset: the best AUROC any observer of the images can reach against
the noisy labels, beside what a perfect observer of the truth reaches, and how to score any model
against the truth instead.

Labels are readers' calls (``readers``), so no model can reach an AUROC of 1 against them. The
readers react to *evidence*: a present marker's severity, and also mimics (lobulation, oedema,
streaks, intraventricular blood) that are visible in the pixels. So the upper bound is the
**evidence observer**: it scores each study by the probability that its label is 1 given what its
site's readers saw (``readers.label_probability``, written by the generator as
``<m>_label_probability``), which is the Bayes-optimal score against the labels. That is
``ceiling``. The **truth observer** (``truth_observer``) scores the true severity (0 when absent):
it ignores the mimics that sway the readers, so it sits below the ceiling and a model that sees the
mimics can beat it. For expansion (not a reader's call, and not knowable at baseline beyond its
risk) both are the AUROC of the true expansion risk (the logistic model's probability from the
true markers, volume and onset time). A method's result is read as a fraction of the ceiling
(``fraction_of_ceiling``); ``score_against_truth`` scores a model's study scores against the true
marker state instead of the labels. ``evidence_scores``, ``truth_scores`` and ``truth_states`` give
them per study and label as arrays, so that the simulation report can score them with the
evaluation's own metrics and intervals (``simulations.report.ceiling_section``). Data generated
before the evidence observer existed have no ``<m>_label_probability``: their ceiling is NaN.

Studies are named by (site_id, patient_id, study_id) as in labels.csv; ``pseudonym_map`` and
``truth_keys`` turn the pseudonymised study keys of the site caches (``client.data.dataset``) into
those.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import MARKERS
from common.study_metrics import auroc
from simulations.synthetic.truth import TruthKey, read_truth


def _observer_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """An observer's AUROC; NaN where its score is missing (data written before it existed)."""
    return float("nan") if np.isnan(score).any() else auroc(y, score)


def read_labels(data_root: Path | str) -> dict[TruthKey, dict[str, str]]:
    """Every site's labels.csv rows by (site_id, patient_id, study_id) (empty cell = not annotated)."""
    out: dict[TruthKey, dict[str, str]] = {}
    for site_id in sorted({k[0] for k in read_truth(data_root)}):
        with (Path(data_root) / site_id / "labels.csv").open(newline="") as f:
            for r in csv.DictReader(f):
                out[(site_id, r["patient_id"], r["study_id"])] = r
    return out


def _baselines(truth: Mapping[TruthKey, Mapping[str, str]], study_keys: Iterable[TruthKey] | None) -> list[TruthKey]:
    keys = list(truth) if study_keys is None else [tuple(k) for k in study_keys]
    return [k for k in keys if k in truth and truth[k]["kind"] == "baseline"]


def _truth_matrix(
    truth: Mapping[TruthKey, Mapping[str, str]], keys: Sequence[TruthKey], names: Sequence[str], column
) -> np.ndarray:
    """[S, C] floats from the truth column ``column(name)`` of each baseline; NaN where the study is
    not a baseline of the truth or the cell is empty (a follow-up carries no markers; expansion is
    known only where a follow-up exists)."""
    out = np.full((len(keys), len(names)), np.nan)
    for i, k in enumerate(keys):
        row = truth.get(tuple(k))
        if row is None or row["kind"] != "baseline":
            continue
        for c, name in enumerate(names):
            value = row.get(column(name), "")
            out[i, c] = float(value) if value != "" else np.nan
    return out


def truth_scores(
    truth: Mapping[TruthKey, Mapping[str, str]], keys: Sequence[TruthKey], names: Sequence[str]
) -> np.ndarray:
    """[S, C]: what a perfect observer of the truth scores each label with: a marker's true
    severity (0 when absent), expansion's true risk (the risk model's probability)."""
    return _truth_matrix(truth, keys, names, lambda n: "expansion_risk" if n == "expansion" else f"{n}_severity")


def evidence_scores(
    truth: Mapping[TruthKey, Mapping[str, str]], keys: Sequence[TruthKey], names: Sequence[str]
) -> np.ndarray:
    """[S, C]: what the evidence observer (the upper bound) scores each label with: the probability
    that a marker's label is 1 given what the readers saw (mimics included); expansion's true risk."""
    return _truth_matrix(
        truth, keys, names, lambda n: "expansion_risk" if n == "expansion" else f"{n}_label_probability"
    )


def truth_states(
    truth: Mapping[TruthKey, Mapping[str, str]], keys: Sequence[TruthKey], names: Sequence[str]
) -> np.ndarray:
    """[S, C]: the true state of each label (0/1: ``<m>_true``, ``expansion_true``), NaN where unknown."""
    return _truth_matrix(truth, keys, names, lambda n: f"{n}_true")


def ceiling_table(data_root: Path | str, study_keys: Iterable[TruthKey] | None = None) -> dict[str, dict[str, Any]]:
    """Per marker (and ``expansion``): ``ceiling`` (AUROC of the evidence observer against the
    written labels: the upper bound), ``truth_observer`` (AUROC of the true severity against them),
    ``n`` (annotated studies), ``positives`` (label = 1) and ``true_positives`` (truth = 1), over the
    baselines among ``study_keys`` (all when None)."""
    truth, labels = read_truth(data_root), read_labels(data_root)
    keys = _baselines(truth, study_keys)
    names = (*MARKERS, "expansion")
    y = np.array([[float(labels[k][n]) if labels[k].get(n, "") != "" else np.nan for n in names] for k in keys])
    y = y.reshape(len(keys), len(names))
    score, true = truth_scores(truth, keys, names), truth_states(truth, keys, names)
    evidence = evidence_scores(truth, keys, names)
    table: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(names):
        known = ~np.isnan(y[:, c])
        table[name] = {
            "ceiling": _observer_auroc(y[known, c], evidence[known, c]),
            "truth_observer": auroc(y[known, c], score[known, c]),
            "n": int(known.sum()),
            "positives": int(y[known, c].sum()),
            "true_positives": int(np.nansum(true[known, c])),
        }
    return table


def score_against_truth(
    data_root: Path | str, study_keys: Sequence[TruthKey], scores: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """AUROC of a model's study scores (per label, in ``study_keys`` order) against the true state
    rather than the readers' labels (baselines only: follow-ups carry no markers; expansion where
    a follow-up exists)."""
    names = list(scores)
    states = truth_states(read_truth(data_root), [tuple(k) for k in study_keys], names)
    return {n: auroc(states[:, c], np.asarray(scores[n], dtype=float)) for c, n in enumerate(names)}


def fraction_of_ceiling(auroc: float, ceiling: float) -> float:
    """A method's AUROC as a share of the ceiling (1 = as good as knowing the truth)."""
    return float(auroc / ceiling) if ceiling and np.isfinite(ceiling) else float("nan")


def pseudonym_map(data_root: Path | str, cache_root: Path | str | None = None) -> dict[str, TruthKey]:
    """Study pseudonym (what a site cache and ``client.data.dataset`` study keys hold, after the
    ``<cache>/``) -> (site_id, patient_id, study_id). ``cache_root`` defaults to the caches of
    ``simulations.sites.prepare_caches`` (``DATA_ROOT/.cache``), whose pseudonym key it reads (never
    creates: a new key would name no cached study): a research-harness view of synthetic data,
    never something a site does. Two studies with one pseudonym (the same patient and study id at
    two sites) cannot be told apart: an error."""
    from client.data.cache import SECRET_FILE, pseudonym, site_secret

    root = Path(cache_root) if cache_root else Path(data_root) / ".cache"
    if not (root / SECRET_FILE).is_file():
        raise FileNotFoundError(f"{root / SECRET_FILE}: no pseudonym key (no site cache was built there)")
    secret = site_secret(root)
    out: dict[str, TruthKey] = {}
    for site, pid, sid in read_labels(data_root):
        name = pseudonym(secret, "study", f"{pid}/{sid}")
        if name in out:
            raise ValueError(f"study pseudonym {name} names a study of {out[name][0]} and one of {site}")
        out[name] = (site, pid, sid)
    return out


def truth_keys(study_keys: Iterable[str], by_pseudonym: Mapping[str, TruthKey]) -> list[TruthKey]:
    """Dataset study keys (``<cache>/<pseudonym>``, also of virtual sites, which keep their source
    studies' pseudonyms) as truth keys, in the same order."""
    out = []
    for k in study_keys:
        name = str(k).rsplit("/", 1)[-1]
        if name not in by_pseudonym:
            raise KeyError(f"study {name} is not a study of the data root (caches built with another key?)")
        out.append(by_pseudonym[name])
    return out
