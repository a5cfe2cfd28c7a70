"""The ceiling of a generated dataset: how well a perfect observer of the truth scores against the
noisy labels, and how to score any model against the truth instead.

Labels are readers' calls (``readers``), so no model can reach an AUROC of 1 against them: the
best any model can do is to know the truth. ``ceiling_table`` gives, per marker, the AUROC of the
true severity (0 when absent) as the score against the written labels on the chosen studies, and
for expansion the AUROC of the true expansion risk (the logistic model's probability from the
true markers, volume and onset time) against the expansion label. A method's result is then read
as a fraction of that ceiling (``fraction_of_ceiling``); ``score_against_truth`` scores a model's
study scores against the true marker state instead of the labels.

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
from common.metrics import roc_auc_per_marker
from simulations.synthetic.truth import TruthKey, read_truth


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC of one label column (``common.metrics``, the metric every method is scored with)."""
    return roc_auc_per_marker(np.asarray(y, dtype=float), np.asarray(score, dtype=float), ["x"])["x"]


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


def ceiling_table(data_root: Path | str, study_keys: Iterable[TruthKey] | None = None) -> dict[str, dict[str, Any]]:
    """Per marker (and ``expansion``): ``ceiling`` (AUROC of the perfect observer of the truth
    against the written labels), ``n`` (annotated studies), ``positives`` (label = 1) and
    ``true_positives`` (truth = 1), over the baselines among ``study_keys`` (all when None)."""
    truth, labels = read_truth(data_root), read_labels(data_root)
    keys = _baselines(truth, study_keys)
    table: dict[str, dict[str, Any]] = {}
    for name in (*MARKERS, "expansion"):
        known = [k for k in keys if labels[k].get(name, "") != ""]
        y = np.array([int(labels[k][name]) for k in known])
        if name == "expansion":
            score = np.array([float(truth[k]["expansion_risk"]) for k in known])
            true = np.array([int(truth[k].get("expansion_true") or 0) for k in known])
        else:
            score = np.array([float(truth[k][f"{name}_severity"]) for k in known])
            true = np.array([int(truth[k][f"{name}_true"]) for k in known])
        table[name] = {
            "ceiling": _auroc(y, score),
            "n": len(known),
            "positives": int(y.sum()),
            "true_positives": int(true.sum()),
        }
    return table


def score_against_truth(
    data_root: Path | str, study_keys: Sequence[TruthKey], scores: Mapping[str, Sequence[float]]
) -> dict[str, float]:
    """AUROC of a model's study scores (per marker, in ``study_keys`` order) against the true
    marker state rather than the readers' labels (baselines only: follow-ups carry no markers)."""
    truth = read_truth(data_root)
    base = set(_baselines(truth, study_keys))
    out = {}
    for m, s in scores.items():
        pairs = [(int(truth[tuple(k)][f"{m}_true"]), v) for k, v in zip(study_keys, s) if tuple(k) in base]
        y, v = (np.array(x) for x in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
        out[m] = _auroc(y, v)
    return out


def fraction_of_ceiling(auroc: float, ceiling: float) -> float:
    """A method's AUROC as a share of the ceiling (1 = as good as knowing the truth)."""
    return float(auroc / ceiling) if ceiling and np.isfinite(ceiling) else float("nan")


def pseudonym_map(data_root: Path | str, cache_root: Path | str | None = None) -> dict[str, TruthKey]:
    """Study pseudonym (what a site cache and ``client.data.dataset`` study keys hold, after the
    ``<cache>/``) -> (site_id, patient_id, study_id). ``cache_root`` defaults to the caches of
    ``simulations.sites.prepare_caches`` (``DATA_ROOT/.cache``), whose pseudonym key it reads: a
    research-harness view of synthetic data, never something a site does."""
    from client.data.cache import pseudonym, site_secret

    secret = site_secret(Path(cache_root) if cache_root else Path(data_root) / ".cache")
    return {pseudonym(secret, "study", f"{pid}/{sid}"): (site, pid, sid) for site, pid, sid in read_labels(data_root)}


def truth_keys(study_keys: Iterable[str], by_pseudonym: Mapping[str, TruthKey]) -> list[TruthKey]:
    """Dataset study keys (``<cache>/<pseudonym>``) as truth keys, in the same order."""
    return [by_pseudonym[str(k).rsplit("/", 1)[-1]] for k in study_keys]
