"""The report's expansion section (docs/gan.md, "Expansion prediction"): the head's study-level
C-statistic beside volume alone and the marker-count score, on the same test studies.

Per scenario and seed the runner keeps the comparators of its test studies (``comparator_record``:
the reference baseline volume, and the marker-count score fitted on that seed's training split
only, ``simulations.expansion_baselines``). For every method whose model has the expansion head,
its study expansion logits (the maximum over slices holding predicted hematoma, as for the markers,
divided by the validation temperature) are joined to them by study. Each AUROC is computed within
a seed and averaged over seeds; 95 % intervals resample patients within each seed and class
(``common.study_metrics``), and the differences head - comparator are paired (one resample scores
all three). Everything runs in the simulation's one process; only these summaries are written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from client.data.dataset import pooled
from common.study_metrics import auroc, bootstrap_ci, class_strata, stratum_mean
from simulations.expansion_baselines import StudyTable, comparator_scores, study_table
from simulations.report.files import json_safe
from simulations.report.sections import Paragraph, Section, Table
from simulations.report.studies import cell, entries_of, methods_of, view

EXPANSION = "expansion"
#: The three scores, then the paired differences, as ``expansion.json`` names them.
SCORES = ("head", "volume", "marker_score")
DIFFERENCES = ("head_minus_volume", "head_minus_marker_score")


def _table(datasets: Sequence[Dataset]) -> StudyTable:
    non_empty = [d for d in datasets if len(d)]
    if not non_empty:
        return StudyTable(np.zeros(0, dtype=str), np.zeros(0), np.zeros(0), np.zeros(0, dtype=int))
    return study_table(pooled(non_empty))


def comparator_record(scenario: str, seed: int, train: Sequence[Dataset], test: Sequence[Dataset]) -> dict[str, Any]:
    """One scenario and seed: per test study with an expansion label and a reference hematoma, its
    label, volume and marker-count score (fitted on ``train``'s studies only)."""
    train_t, test_t = _table(train), _table(test)
    scores = comparator_scores(train_t, test_t)
    return {
        "scenario": scenario,
        "seed": seed,
        "studies": test_t.studies,
        "expansion": test_t.expansion,
        "volume": scores["volume"],
        "marker_score": scores["marker_score"],
        "n_train": int(len(train_t.studies)),
        "n_train_positive": int(train_t.expansion.sum()),
    }


@dataclass(frozen=True)
class Joined:
    """A method's test studies that have every score, over all seeds (one row per seed and study)."""

    expansion: np.ndarray
    scores: dict[str, np.ndarray]  # SCORES -> [n]
    patients: np.ndarray
    strata: np.ndarray  # "seed=S"


def joined(entries: Sequence[dict], records: Sequence[dict]) -> Joined:
    """The head's calibrated study logits beside the comparators of the same studies and seed."""
    by_seed = {r["seed"]: r for r in records}
    cols: dict[str, list] = {k: [] for k in ("expansion", "patients", "strata", *SCORES)}
    for entry in entries:
        record = by_seed.get(entry["seed"])
        outputs = view(entry, "calibrated")
        if record is None or EXPANSION not in outputs.names:
            continue
        row_of = {str(s): i for i, s in enumerate(record["studies"])}
        c = outputs.names.index(EXPANSION)
        for k, study in enumerate(outputs.studies):
            i = row_of.get(str(study))
            if i is None or np.isnan(outputs.labels[k, c]):
                continue
            cols["expansion"].append(float(record["expansion"][i]))
            cols["head"].append(outputs.logits[k, c])
            cols["volume"].append(float(record["volume"][i]))
            cols["marker_score"].append(float(record["marker_score"][i]))
            cols["patients"].append(str(outputs.patients[k]))
            cols["strata"].append(f"seed={entry['seed']}")
    return Joined(
        np.asarray(cols["expansion"], dtype=float),
        {s: np.asarray(cols[s], dtype=float) for s in SCORES},
        np.asarray(cols["patients"], dtype=str),
        np.asarray(cols["strata"], dtype=str),
    )


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC; NaN where a score is missing (a seed whose training split could not fit the marker score)."""
    return float("nan") if np.isnan(score).any() else auroc(y, score)


def score_intervals(data: Joined, n_boot: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Each score's AUROC and the paired differences head - volume and head - marker score, each with
    its interval (metric within seed, mean over seeds; patients resampled within seed and class)."""
    y, s = data.expansion, data.scores
    resample = class_strata(y, data.patients, data.strata)

    def interval(metric: Callable[[np.ndarray], float]) -> dict[str, float]:
        return bootstrap_ci(stratum_mean(metric, data.strata), data.patients, resample, n_boot, seed=seed).to_dict()

    out = {name: interval(lambda idx, v=s[name]: _auc(y[idx], v[idx])) for name in SCORES}
    for name, other in zip(DIFFERENCES, SCORES[1:]):
        out[name] = interval(lambda idx, v=s[other]: _auc(y[idx], s["head"][idx]) - _auc(y[idx], v[idx]))
    return out


def expansion_tables(
    studies: Sequence[dict], records: Sequence[dict], n_boot: int, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Per scenario, one row per method with the expansion head: n, positives, patients, the
    training studies the marker score was fitted on, and ``score_intervals``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        mine = [r for r in records if r["scenario"] == scenario]
        for method in methods_of(studies, scenario):
            entries = entries_of(studies, scenario, method)
            if not entries or EXPANSION not in entries[0]["outputs"].names:
                continue
            data = joined(entries, mine)
            used = sorted({e["seed"] for e in entries} & {r["seed"] for r in mine})
            out.setdefault(scenario, []).append(
                {
                    "method": method,
                    "n": int(data.expansion.size),
                    "n_pos": int((data.expansion == 1).sum()),
                    "n_patients": int(np.unique(np.char.add(data.strata, data.patients)).size),
                    "seeds": used,
                    "n_train": sum(r["n_train"] for r in mine if r["seed"] in used),
                    "n_train_positive": sum(r["n_train_positive"] for r in mine if r["seed"] in used),
                    **score_intervals(data, n_boot, seed),
                }
            )
    return out


NOTE = (
    "The head's study-level C-statistic (AUROC of the study's expansion probability: the maximum over "
    "its slices holding predicted hematoma, as for the markers) against the expansion label of the "
    "baseline studies in the test split, beside two comparators on the same studies: the reference "
    "baseline hematoma volume alone, and the marker-count score (logistic regression on the number of "
    "reader-labelled markers and the baseline volume, fitted on the training split only). Both "
    "comparators read the reference annotations, which the model never sees. AUROC per seed, mean over "
    "seeds; 95 % intervals resample patients within each seed and class; differences are paired."
)


def expansion_section(tables: dict[str, list[dict[str, Any]]]) -> Section | None:
    """The report's table; None when no method has the expansion head."""
    if not tables:
        return None
    rows = [
        [
            scenario,
            r["method"],
            f"{r['n']} ({r['n_pos']})",
            f"{r['n_train']} ({r['n_train_positive']})",
            *(cell(r[k]) for k in (*SCORES, *DIFFERENCES)),
        ]
        for scenario, method_rows in tables.items()
        for r in method_rows
    ]
    header = ["scenario", "method", "test n (pos)", "train n (pos)", "head", "volume alone", "marker-count score"]
    return Section(
        "Expansion prediction (study level)",
        [
            Paragraph(NOTE),
            Table([*header, "head - volume", "head - marker score"], rows),
            Paragraph(
                "With a handful of positive test studies every figure here is noisy: read the intervals.", note=True
            ),
        ],
    )


def write_expansion(out_dir: Path, studies: Sequence[dict], records: Sequence[dict], n_boot: int) -> Section | None:
    """``expansion.json`` (when a method has the expansion head) and the report's section."""
    tables = expansion_tables(studies, records, n_boot)
    if not tables:
        return None
    doc = {"note": NOTE, "n_boot": n_boot, "scenarios": tables}
    (out_dir / "expansion.json").write_text(json.dumps(json_safe(doc), indent=1))
    return expansion_section(tables)
