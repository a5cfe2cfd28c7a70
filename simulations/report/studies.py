"""The study-level results a paper quotes, from every method's per-study test outputs.

Input: ``Results.studies`` (``simulations.runner``), one entry per scenario, method, seed and
evaluation site: the test ``StudyOutputs`` and the temperature and thresholds the method's model
chose on validation. Per method, sites are pooled within each seed and seeds are strata
(``common.study_metrics``: metric per seed, mean over seeds, patients resampled within each seed).

Three views of the same logits:

- raw: as the model gives them (the ECE "before calibration");
- calibrated: each entry's logits divided by its validation temperature (AUROC, AUPRC, Brier, ECE);
- decision: calibrated logits minus the logit of the entry's threshold, so that 0.5 is every
  model's own validation threshold (sensitivity and specificity; a local method has one threshold
  per site model).

Everything here runs in the simulation's one process, which holds every site's data anyway; a
federated server never sees per-study outputs (``common.validation``). Study and patient keys are
pseudonyms, never identifiers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from common.config import MARKERS
from common.study_metrics import (
    StudyOutputs,
    align_outputs,
    bootstrap_ci,
    concat_outputs,
    dice_interval,
    ece,
    macro_auroc,
    paired_difference,
    stratum_mean,
    summarise,
)

MODES = ("raw", "calibrated", "decision")
#: Bootstrap replicates of the per-site table (smaller sites, many rows: fewer replicates).
SITE_BOOT = 200


def entries_of(studies: Sequence[dict], scenario: str, method: str) -> list[dict]:
    return [e for e in studies if e["scenario"] == scenario and e["method"] == method and len(e["outputs"])]


def methods_of(studies: Sequence[dict], scenario: str) -> list[str]:
    return list(dict.fromkeys(e["method"] for e in studies if e["scenario"] == scenario))


def view(entry: dict, mode: str) -> StudyOutputs:
    """One entry's outputs in one of ``MODES`` (see the module docstring)."""
    o: StudyOutputs = entry["outputs"]
    if mode == "raw":
        return o
    z = o.logits / np.asarray(entry["temperature"], dtype=np.float64)
    if mode == "decision":
        th = np.clip(np.asarray(entry["thresholds"], dtype=np.float64), 1e-9, 1 - 1e-9)
        z = z - np.log(th / (1 - th))
    return replace(o, logits=z)


def pooled(entries: Sequence[dict], mode: str) -> StudyOutputs:
    """Sites pooled, seeds as strata."""
    return concat_outputs([view(e, mode) for e in entries], [f"seed={e['seed']}" for e in entries])


def marker_columns(outputs: StudyOutputs) -> list[int]:
    return [c for c, n in enumerate(outputs.names) if n in MARKERS]


def _interval(statistic, outputs: StudyOutputs, n_boot: int, seed: int) -> dict[str, float]:
    return bootstrap_ci(
        stratum_mean(statistic, outputs.strata()), outputs.patients, outputs.strata(), n_boot, seed=seed
    ).to_dict()


def method_rows(entries: Sequence[dict], n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per marker: n, n_pos, AUROC, AUPRC, Brier, ECE (calibrated), ECE raw, sensitivity and
    specificity at the validation thresholds; then a ``macro`` row (macro AUROC over markers)."""
    cal, dec, raw = (pooled(entries, m) for m in ("calibrated", "decision", "raw"))
    cols = marker_columns(cal)
    rows = summarise(cal, columns=cols, n_boot=n_boot, seed=seed, only=("auroc", "auprc", "brier", "ece"))
    at_threshold = summarise(dec, columns=cols, n_boot=n_boot, seed=seed, only=("sensitivity", "specificity"))
    before = summarise(raw, columns=cols, n_boot=0, seed=seed, only=("ece",))
    for r, d, b in zip(rows, at_threshold, before):
        r["sensitivity"], r["specificity"] = d["sensitivity"], d["specificity"]
        r["ece_raw"] = b["ece"]
        del r["threshold"]
    y, z = cal.labels[:, cols], cal.logits[:, cols]
    rows.append(
        {
            "marker": "macro",
            "n": int(np.isfinite(y).any(axis=1).sum()),
            "auroc": _interval(lambda idx: macro_auroc(y[idx], z[idx]), cal, n_boot, seed),
        }
    )
    return rows


def headline(studies: Sequence[dict], scenario: str, n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """The headline table of one scenario: ``method_rows`` of every method, each row with its method."""
    out = []
    for method in methods_of(studies, scenario):
        entries = entries_of(studies, scenario, method)
        if entries:
            out += [{"method": method, **r} for r in method_rows(entries, n_boot, seed)]
    return out


def paired(studies: Sequence[dict], scenario: str, n_boot: int, seed: int = 0) -> list[dict[str, Any]]:
    """Macro-AUROC difference (calibrated logits) for every pair of methods, paired by study."""
    rows = []
    for a, b in itertools.combinations(methods_of(studies, scenario), 2):
        ea, eb = entries_of(studies, scenario, a), entries_of(studies, scenario, b)
        if not ea or not eb:
            continue
        oa, ob = pooled(ea, "calibrated"), pooled(eb, "calibrated")
        try:
            diff = paired_difference(oa, ob, marker_columns(oa), n_boot=n_boot, seed=seed)
        except ValueError:  # no common study (e.g. different splits)
            continue
        rows.append({"a": a, "b": b, "difference": diff.to_dict()})
    return rows


def planned(
    studies: Sequence[dict], scenario: str, comparisons: Sequence[Any], n_boot: int, seed: int = 0
) -> list[dict[str, Any]]:
    """The experiment's planned comparisons (``simulations.experiment.Comparison``: ``a``, ``b``,
    ``marker``): ``a`` minus ``b`` in that marker's study AUROC (calibrated logits) on their common
    studies, paired by study, patients resampled within each seed; n and n_pos of those studies."""
    rows = []
    for c in comparisons:
        ea, eb = entries_of(studies, scenario, c.a), entries_of(studies, scenario, c.b)
        if not ea or not eb:
            continue
        oa, ob = align_outputs(pooled(ea, "calibrated"), pooled(eb, "calibrated"))
        col = list(oa.names).index(c.marker)
        y = oa.labels[:, col]
        diff = paired_difference(oa, ob, [col], n_boot=n_boot, seed=seed)
        known = ~np.isnan(y)
        rows.append(
            {
                "a": c.a,
                "b": c.b,
                "marker": c.marker,
                "n": int(known.sum()),
                "n_pos": int((y[known] == 1).sum()),
                "difference": diff.to_dict(),
            }
        )
    return rows


def per_site(studies: Sequence[dict], scenario: str, n_boot: int = SITE_BOOT, seed: int = 0) -> list[dict[str, Any]]:
    """Per method and site: n and n_pos per marker, the macro AUROC and the per-study Dice with intervals."""
    out = []
    for method in methods_of(studies, scenario):
        entries = entries_of(studies, scenario, method)
        for site in dict.fromkeys(e["site"] for e in entries):
            mine = [e for e in entries if e["site"] == site]
            cal = pooled(mine, "calibrated")
            cols = marker_columns(cal)
            y, z = cal.labels[:, cols], cal.logits[:, cols]
            counts = {
                cal.names[c]: {
                    "n": int((~np.isnan(cal.labels[:, c])).sum()),
                    "n_pos": int((cal.labels[:, c] == 1).sum()),
                }
                for c in cols
            }
            auc = _interval(lambda idx, y=y, z=z: macro_auroc(y[idx], z[idx]), cal, n_boot, seed)
            out.append(
                {"method": method, "site": site, "marker": "macro", "n": len(cal), "auroc": auc, "markers": counts}
            )
            out.append({"method": method, "site": site, "marker": "dice", **dice_row(mine, n_boot, seed)})
    return out


def dice_row(entries: Sequence[dict], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean per-study Dice of the studies with a reference mask, patient bootstrap interval (seeds kept apart)."""
    counts, patients = [], []
    for e in entries:
        patient_of = dict(zip(e["outputs"].studies.tolist(), e["outputs"].patients.tolist()))
        for study, c in e["dice_counts"].items():
            counts.append(c)
            patients.append(f"{e['seed']}:{patient_of.get(study, study)}")
    if not counts:
        return {"n": 0, "dice": None}
    return {
        "n": len(counts),
        "dice": dice_interval(np.asarray(counts), np.asarray(patients), n_boot, seed=seed).to_dict(),
    }


def reliability(entries: Sequence[dict], bins: int = 10) -> dict[str, Any]:
    """Per mode (raw, calibrated): mean predicted vs observed per probability bin, markers pooled, and ECE."""
    out = {}
    for mode in ("raw", "calibrated"):
        o = pooled(entries, mode)
        cols = marker_columns(o)
        y, p = o.labels[:, cols].ravel(), o.probabilities()[:, cols].ravel()
        known = ~np.isnan(y)
        y, p = y[known], p[known]
        edges = np.linspace(0, 1, bins + 1)
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        pts = [
            (float(p[which == b].mean()), float(y[which == b].mean()), int((which == b).sum()))
            for b in range(bins)
            if (which == b).any()
        ]
        out[mode] = {"points": pts, "ece": ece(y, p)}
    return out


def to_json(studies: Sequence[dict]) -> list[dict[str, Any]]:
    """``studies.json``: every entry with pseudonymous keys only."""
    return [
        {
            "scenario": e["scenario"],
            "method": e["method"],
            "seed": e["seed"],
            "site": e["site"],
            "temperature": [float(v) for v in e["temperature"]],
            "thresholds": [float(v) for v in e["thresholds"]],
            "outputs": e["outputs"].to_dict(),
            "dice_counts": {str(k): [int(x) for x in v] for k, v in e["dice_counts"].items()},
        }
        for e in studies
    ]


def from_json(doc: Sequence[dict]) -> list[dict[str, Any]]:
    return [
        {
            **{k: e[k] for k in ("scenario", "method", "seed", "site")},
            "temperature": np.asarray(e["temperature"]),
            "thresholds": np.asarray(e["thresholds"]),
            "outputs": StudyOutputs.from_dict(e["outputs"]),
            "dice_counts": {k: tuple(v) for k, v in e["dice_counts"].items()},
        }
        for e in doc
    ]


# --- text ------------------------------------------------------------------------------------------


def cell(iv: dict | None) -> str:
    """``0.812 [0.701, 0.903]``; ``n/a`` where undefined."""
    if not iv or iv.get("estimate") is None or np.isnan(iv["estimate"]):
        return "n/a"
    if iv.get("low") is None or np.isnan(iv["low"]):
        return f"{iv['estimate']:.3f}"
    return f"{iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"


HEADLINE_COLUMNS = ("auroc", "auprc", "brier", "ece", "sensitivity", "specificity")


def markdown(rows: Sequence[dict], paired_rows: Sequence[dict], title: str, planned_rows: Sequence[dict] = ()) -> str:
    """The headline, paired and planned-comparison tables as markdown (``--results``, the README)."""
    lines = [f"### {title}", "", "| method | marker | n (pos) | " + " | ".join(HEADLINE_COLUMNS) + " |"]
    lines.append("| --- " * (3 + len(HEADLINE_COLUMNS)) + "|")
    for r in rows:
        npos = f"{r['n']} ({r['n_pos']})" if "n_pos" in r else str(r["n"])
        lines.append(
            f"| {r['method']} | {r['marker']} | {npos} | " + " | ".join(cell(r.get(c)) for c in HEADLINE_COLUMNS) + " |"
        )
    if paired_rows:
        lines += ["", "| A | B | macro-AUROC A - B [95 % CI] |", "| --- | --- | --- |"]
        lines += [f"| {p['a']} | {p['b']} | {cell(p['difference'])} |" for p in paired_rows]
    if planned_rows:
        lines += ["", *planned_markdown(planned_rows)]
    return "\n".join(lines) + "\n"


def planned_markdown(planned_rows: Sequence[dict]) -> list[str]:
    """The planned comparisons' table as markdown lines."""
    return [
        "Planned comparisons (paired by study):",
        "",
        "| A | B | marker | n (pos) | study AUROC A - B [95 % CI] |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {p['a']} | {p['b']} | {p['marker']} | {p['n']} ({p['n_pos']}) | {cell(p['difference'])} |"
            for p in planned_rows
        ),
    ]


def console(rows: Sequence[dict], scenario: str) -> str:
    """The console headline: macro and per-marker study AUROC with 95 % intervals, per method."""
    lines = [f"{scenario}: study-level AUROC [95 % CI] (test patients of all sites; seeds pooled)"]
    markers = list(dict.fromkeys(r["marker"] for r in rows))
    lines.append(f"  {'method':30s}" + "".join(f"{m[:22]:>25s}" for m in markers))
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {r["marker"]: r for r in rows if r["method"] == method}
        lines.append(f"  {method[:30]:30s}" + "".join(f"{cell(by.get(m, {}).get('auroc')):>25s}" for m in markers))
    return "\n".join(lines)


def study_tables(
    studies: Sequence[dict], n_boot: int, seed: int = 0, comparisons: Sequence[Any] = ()
) -> dict[str, dict[str, list]]:
    """Per scenario: the ``headline``, ``paired``, ``planned`` (the experiment's ``comparisons``) and
    ``per_site`` tables (``study_metrics.json``)."""
    return {
        scenario: {
            "headline": headline(studies, scenario, n_boot, seed),
            "paired": paired(studies, scenario, n_boot, seed),
            "planned": planned(studies, scenario, comparisons, n_boot, seed),
            "per_site": per_site(studies, scenario, min(n_boot, SITE_BOOT), seed),
        }
        for scenario in dict.fromkeys(e["scenario"] for e in studies)
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m simulations.report.studies RUN_DIR [--experiment NAME]``: the planned comparisons of
    an existing run (its ``studies.json``) as markdown, e.g. for comparisons added after it ran."""
    import argparse
    import json
    from pathlib import Path

    from simulations.experiment import load_experiment

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--experiment", help="whose [[comparisons]] (default: the run's experiment.toml)")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args(argv)
    exp = load_experiment(args.experiment or args.run_dir / "experiment.toml")
    studies = from_json(json.loads((args.run_dir / "studies.json").read_text()))
    for scenario in dict.fromkeys(e["scenario"] for e in studies):
        rows = planned(studies, scenario, exp.comparisons, args.boot)
        print(
            "\n".join([f"### {exp.name}: {scenario} ({args.boot} bootstrap replicates)", "", *planned_markdown(rows)])
        )


if __name__ == "__main__":
    main()
