"""The report's "Ceiling" section (issue 12, docs/synthetic-data.md): on data written by
``hemexp generate`` (it has ``.truth/truth.csv``), every method's study AUROC read against what the
labels allow.

Per scenario, method and label (the markers, and expansion where a method predicts it), on the
baselines among the method's pooled test studies (seeds as strata, as in ``studies.headline``):

- ``auroc``: the method's study AUROC against the readers' labels (the headline's figure), with
  the evaluation's 95 % patient-bootstrap interval (``common.study_metrics``);
- ``ceiling``: the upper bound, the AUROC of the evidence observer against the same labels
  (``simulations.synthetic.ceiling``: the probability of each label given what the readers saw,
  mimics included; for expansion the true risk), mean over seeds; it is not a model figure, so it
  has no interval;
- ``truth_observer``: the AUROC of a perfect observer of the truth (true severity, true expansion
  risk) against the labels: below the ceiling, since the readers also react to mimics;
- ``fraction``: the AUROC (and its interval bounds) as a share of the ceiling;
- ``vs_truth``: the method's study AUROC against the true state instead of the labels, with its
  interval.

The truth is read here, by the report, only: training and the site caches never see it. Study
keys are pseudonyms (``pseudonym_map``, ``truth_keys``); what is written (``ceiling.json``, the
table, the chart) holds counts and figures, never a study or patient key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.config import LABELS
from common.study_metrics import summarise
from simulations.report.figures import _plt, _save
from simulations.report.files import json_safe
from simulations.report.sections import Figure, Paragraph, Section, Table
from simulations.report.studies import cell, entries_of, methods_of, pooled
from simulations.report.tables import slug
from simulations.synthetic.ceiling import (
    evidence_scores,
    fraction_of_ceiling,
    pseudonym_map,
    truth_keys,
    truth_scores,
    truth_states,
)
from simulations.synthetic.truth import TruthKey, read_truth, truth_path

CEILING_FILE = "ceiling.json"


def method_ceiling_rows(
    entries: Sequence[dict],
    truth: Mapping[TruthKey, Mapping[str, str]],
    by_pseudonym: Mapping[str, TruthKey],
    n_boot: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One method's rows (module docstring), one per label its model outputs."""
    out = pooled(entries, "calibrated")  # the headline's view: per-model temperatures before pooling sites
    keys = truth_keys(out.studies, by_pseudonym)
    base = np.flatnonzero([truth.get(k, {}).get("kind") == "baseline" for k in keys])
    out, keys = out.subset(base), [keys[i] for i in base]
    cols = [c for c, n in enumerate(out.names) if n in LABELS]
    states = truth_states(truth, keys, out.names)
    only = ("auroc",)
    model = summarise(out, columns=cols, n_boot=n_boot, seed=seed, only=only)
    vs_truth = summarise(replace(out, labels=states), columns=cols, n_boot=n_boot, seed=seed, only=only)
    observer = summarise(replace(out, logits=truth_scores(truth, keys, out.names)), columns=cols, n_boot=0, only=only)
    evidence = evidence_scores(truth, keys, out.names)
    rows = []
    for c, m, t, o in zip(cols, model, vs_truth, observer):
        ceiling = _observer(out, evidence, c)
        known = ~np.isnan(out.labels[:, c])
        rows.append(
            {
                "label": out.names[c],
                "n": m["n"],
                "reader_pos": m["n_pos"],
                "true_pos": int(np.nansum(states[known, c])),
                "auroc": m["auroc"],
                "ceiling": ceiling,
                "truth_observer": o["auroc"]["estimate"],
                "fraction": {k: fraction_of_ceiling(m["auroc"][k], ceiling) for k in ("estimate", "low", "high")},
                "n_truth": t["n"],
                "vs_truth": t["auroc"],
            }
        )
    return rows


def _observer(out, scores: np.ndarray, column: int) -> float:
    """An observer's AUROC on one label column of ``out`` (the evaluation's own metric), NaN where
    its score is missing (data generated before the evidence observer was written)."""
    if np.isnan(scores[~np.isnan(out.labels[:, column]), column]).any():
        return float("nan")
    est = summarise(replace(out, logits=scores), columns=[column], n_boot=0, only=("auroc",))[0]["auroc"]["estimate"]
    return float("nan") if est is None else float(est)


def ceiling_tables(data_root: Path | str, studies: Sequence[dict], n_boot: int, seed: int = 0) -> dict[str, list]:
    """Per scenario: every method's ``method_ceiling_rows`` (each with its ``method``); ``{}`` when
    the data have no truth (not written by ``hemexp generate``)."""
    if not truth_path(data_root).is_file():
        return {}
    truth, by_pseudonym = read_truth(data_root), pseudonym_map(data_root)
    tables: dict[str, list] = {}
    for scenario in dict.fromkeys(e["scenario"] for e in studies):
        rows = []
        for method in methods_of(studies, scenario):
            entries = entries_of(studies, scenario, method)
            if entries:
                rows += [
                    {"method": method, **r} for r in method_ceiling_rows(entries, truth, by_pseudonym, n_boot, seed)
                ]
        tables[scenario] = rows
    return tables


def read_ceiling(out_dir: Path) -> dict[str, list]:
    """A report folder's ``ceiling.json`` (``{}`` where the report has no ceiling section)."""
    path = Path(out_dir) / CEILING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# --- text, chart and HTML ------------------------------------------------------------------------


def _fixed(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or np.isnan(v) else f"{v:.{digits}f}"


#: The ceiling table's columns: header, console width, alignment (text columns cut to their width).
COLUMNS = (
    ("method", 20, "<"),
    ("label", 17, "<"),
    ("n", 4, ">"),
    ("reader+", 7, ">"),
    ("true+", 5, ">"),
    ("AUROC [95 % CI]", 24, ">"),
    ("ceiling", 7, ">"),
    ("truth obs.", 10, ">"),
    ("share", 5, ">"),
    ("vs truth [95 % CI]", 24, ">"),
)
TITLE = (
    "{}: study AUROC beside the ceiling (the upper bound: an observer of the readers' evidence vs the labels)"
    " and a perfect observer of the true severity"
)


def _cells(r: dict) -> list[str]:
    """One row's values as text, in ``COLUMNS`` order (the console and the markdown table share them)."""
    return [
        r["method"],
        r["label"],
        str(r["n"]),
        str(r["reader_pos"]),
        str(r["true_pos"]),
        cell(r["auroc"]),
        _fixed(r["ceiling"]),
        _fixed(r.get("truth_observer")),
        _fixed(r["fraction"]["estimate"], 2),
        cell(r["vs_truth"]),
    ]


def console(rows: Sequence[dict], scenario: str) -> str:
    """The ceiling table as text (``simulate.py``'s console, ``benchmarks.bench_difficulty``)."""

    def line(values: Sequence[str]) -> str:
        return "  " + " ".join(
            f"{v[:w] if a == '<' else v:{a}{w}s}" for v, (_, w, a) in zip(values, COLUMNS, strict=True)
        )

    return "\n".join([TITLE.format(scenario), line([c[0] for c in COLUMNS]), *(line(_cells(r)) for r in rows)])


def markdown(rows: Sequence[dict], scenario: str) -> str:
    """The ceiling table as markdown (``benchmarks.bench_difficulty --results``)."""
    lines = [TITLE.format(scenario), "", "| " + " | ".join(c[0] for c in COLUMNS) + " |", "| --- " * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_ceiling(rows: Sequence[dict], scenario: str, path: Path) -> Path | None:
    """Each method's study AUROC per label (95 % interval as an error bar), the ceiling of its
    studies drawn as a black line across its bar, chance as a dotted line."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2.5, 3.6))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        by = {r["label"]: r for r in rows if r["method"] == method}
        xs = [i - 0.4 + width * (j + 0.5) for i, label in enumerate(labels) if label in by]
        mine = [by[label] for label in labels if label in by]
        est = np.array([np.nan if r["auroc"]["estimate"] is None else r["auroc"]["estimate"] for r in mine], float)
        low = np.array([np.nan if r["auroc"]["low"] is None else r["auroc"]["low"] for r in mine], float)
        high = np.array([np.nan if r["auroc"]["high"] is None else r["auroc"]["high"] for r in mine], float)
        err = np.nan_to_num(np.stack([est - low, high - est]), nan=0.0)
        ax.bar(xs, np.nan_to_num(est), width * 0.9, yerr=err, capsize=2, label=method)
        ceilings = np.array([np.nan if r["ceiling"] is None else r["ceiling"] for r in mine], float)
        observers = np.array([np.nan if r.get("truth_observer") is None else r["truth_observer"] for r in mine], float)
        ax.hlines(ceilings, np.subtract(xs, width / 2), np.add(xs, width / 2), colors="black", linewidth=2)
        ax.hlines(observers, np.subtract(xs, width / 2), np.add(xs, width / 2), colors="black", linestyles="--")
    ax.plot([], [], color="black", linewidth=2, label="ceiling (observer of the readers' evidence)")
    ax.plot([], [], color="black", linestyle="--", label="observer of the true severity")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(labels)), [label.replace("_", "\n") for label in labels], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("study AUROC vs readers' labels")
    ax.set_title(f"{scenario}: methods beside the ceiling", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def write_ceiling(
    out_dir: Path, data_root: Path | str | None, studies: Sequence[dict], figs: Path, n_boot: int
) -> Section | None:
    """The section (``simulations.report.sections``, rendered by the page like every optional section):
    write ``ceiling.json`` and return the tables and charts (None without a truth; ``figs``: where the
    charts go). A ceiling that cannot be computed (caches built with another pseudonym key) leaves a
    note that says why, not a lost report."""
    if data_root is None:
        return None
    try:
        tables = ceiling_tables(data_root, studies, n_boot)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        return Section("Ceiling", [Paragraph(f"No ceiling: {type(exc).__name__}: {exc}", note=True)])
    if not tables:
        return None
    (out_dir / CEILING_FILE).write_text(json.dumps(json_safe(tables), indent=1))
    blocks: list[Paragraph | Table | Figure] = [
        Paragraph(
            "The labels are readers' calls, so no model can reach an AUROC of 1 against them. Ceiling (the "
            "upper bound): the AUROC of an observer of what the readers saw (the probability of each label "
            "given the evidence they react to, mimics included; for expansion the true risk) against the same "
            "labels, on the baselines among each method's test studies (mean over seeds). Truth observer: the "
            "AUROC of a perfect observer of the true severity; it is lower, because the readers also call "
            "mimics, which a model can see too. Share: the method's AUROC as a fraction of the ceiling. vs "
            "truth: the method's AUROC against the true state instead of the labels. Intervals: 95 % patient "
            f"bootstrap, seeds as strata ({CEILING_FILE})."
        )
    ]
    for scenario, rows in tables.items():
        blocks.append(Paragraph(f"Scenario: {scenario}"))
        blocks.append(
            Table(
                ["method", "label", "n", "reader +", "true +", "AUROC [95 % CI]", "ceiling", "truth observer"]
                + ["share [95 % CI]", "n (truth)", "AUROC vs truth [95 % CI]"],
                [
                    [r["method"], r["label"], r["n"], r["reader_pos"], r["true_pos"], cell(r["auroc"])]
                    + [_fixed(r["ceiling"]), _fixed(r.get("truth_observer"))]
                    + [cell(r["fraction"]), r["n_truth"], cell(r["vs_truth"])]
                    for r in rows
                ],
            )
        )
        chart = plot_ceiling(rows, scenario, figs / f"{slug(scenario)}_ceiling.png")
        if chart is not None:
            blocks.append(Figure(chart, f"{scenario}: AUROC and ceiling"))
    return Section("Ceiling", blocks)
