"""Two runs of the same experiment (e.g. on two fresh clones): the same test patients, the same figures?

Compares two ``simulate.py`` reports, seed by seed (only the seeds both ran):

- splits: per method, seed and site, the set of test patients (``StudyOutputs.patients``, keys that
  are the same on every copy of the data whatever the pseudonym key) must be identical;
- figures, every method: from ``studies.json`` the study-level macro AUROC and each marker's AUROC
  (calibrated logits, sites pooled, the headline's statistics without their intervals), each site
  model's temperature and threshold per marker, and each test study's calibrated logit per marker
  (matched by patient key); from ``metrics.csv`` (when both runs have it) every per-site metric row
  (Dice, slice and study AUROC, AUPRC, Brier, ECE, ...). Per method and seed it prints the macro AUROC
  of both runs and the largest difference over all of that method's figures, then the largest of all.

Run: ``python -m benchmarks.bench_reproducibility RUN_DIR_A RUN_DIR_B [--tolerance 1e-6]``; exit status 1
when a split differs, a figure is in one run only, or two figures differ by more than the tolerance.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.study_metrics import auroc, macro_auroc
from simulations.report.studies import from_json, marker_columns, pooled, view

#: Two fresh clones of one commit must agree to this (issue 28 item 4); the federated path once differed by 0.018.
TOLERANCE = 1e-6


def load(run_dir: Path) -> list[dict]:
    return from_json(json.loads((run_dir / "studies.json").read_text()))


def load_metrics(run_dir: Path) -> list[dict[str, str]] | None:
    """The rows of the report's ``metrics.csv``; None when the run has none."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_patients(entries: Sequence[dict]) -> dict[tuple, frozenset[str]]:
    """(scenario, method, seed, site) -> its test patients."""
    return {(e["scenario"], e["method"], e["seed"], e["site"]): frozenset(e["outputs"].patients) for e in entries}


def _groups(entries: Sequence[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["scenario"], e["method"], e["seed"]), []).append(e)
    return groups


def macro_per_seed(entries: Sequence[dict]) -> dict[tuple, float]:
    """(scenario, method, seed) -> study-level macro AUROC over the markers, sites pooled."""
    out = {}
    for key, group in _groups(entries).items():
        o = pooled(group, "calibrated")
        cols = marker_columns(o)
        out[key] = float(macro_auroc(o.labels[:, cols], o.logits[:, cols]))
    return out


def study_figures(entries: Sequence[dict]) -> dict[tuple, float]:
    """(scenario, method, seed, figure) -> value, for every figure ``studies.json`` gives (module docstring)."""
    out: dict[tuple, float] = {}
    for (scenario, method, seed), group in _groups(entries).items():
        key = (scenario, method, seed)
        o = pooled(group, "calibrated")
        cols = marker_columns(o)
        out[(*key, "macro AUROC")] = float(macro_auroc(o.labels[:, cols], o.logits[:, cols]))
        for c in cols:
            out[(*key, f"{o.names[c]} AUROC")] = float(auroc(o.labels[:, c], o.logits[:, c]))
        for e in group:
            site, names = e["site"], e["outputs"].names
            for c, name in enumerate(names):
                out[(*key, f"{site} {name} temperature")] = float(np.asarray(e["temperature"]).ravel()[c])
                out[(*key, f"{site} {name} threshold")] = float(np.asarray(e["thresholds"]).ravel()[c])
            calibrated = view(e, "calibrated")
            for patient, row in zip(calibrated.patients, calibrated.logits):
                for name, z in zip(names, row):  # a patient's one scored study (the admission CT)
                    out[(*key, f"{site} {patient} {name} logit")] = float(z)
    return out


def metric_figures(rows: Sequence[dict[str, str]] | None) -> dict[tuple, float]:
    """(scenario, method, seed, figure) -> value for every row of ``metrics.csv``."""
    out: dict[tuple, float] = {}
    for r in rows or ():
        seed = int(r["seed"]) if r["seed"].lstrip("-").isdigit() else r["seed"]
        figure = " ".join(p for p in (r["site"], r["marker"], r["metric"]) if p)
        out[(r["scenario"], r["method"], seed, figure)] = float(r["value"])
    return out


def difference(x: float, y: float) -> float:
    """|x - y|; two NaNs (a figure undefined in both runs) agree, one NaN is an infinite difference."""
    if math.isnan(x) and math.isnan(y):
        return 0.0
    if math.isnan(x) or math.isnan(y):
        return math.inf
    return abs(x - y)


def compare(a: Sequence[dict], b: Sequence[dict]) -> tuple[list[str], list[tuple[tuple, float, float]]]:
    """Split differences (as text) and (key, macro AUROC A, macro AUROC B) for the seeds both runs hold."""
    a, b = common_seeds(a, b)
    pa, pb = test_patients(a), test_patients(b)
    problems = [f"{k}: only in one run" for k in sorted(set(pa) ^ set(pb), key=str)]
    problems += [
        f"{k}: {len(pa[k] ^ pb[k])} test patient(s) differ"
        for k in sorted(set(pa) & set(pb), key=str)
        if pa[k] != pb[k]
    ]
    fa, fb = macro_per_seed(a), macro_per_seed(b)
    return problems, [(k, fa[k], fb[k]) for k in sorted(set(fa) & set(fb), key=str)]


def common_seeds(a: Sequence[dict], b: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    seeds = {e["seed"] for e in a} & {e["seed"] for e in b}
    return [e for e in a if e["seed"] in seeds], [e for e in b if e["seed"] in seeds]


def compare_figures(fa: dict[tuple, float], fb: dict[tuple, float]) -> tuple[list[str], dict[tuple, tuple[float, str]]]:
    """Figures in one run only (as text, seeds both runs hold), and per (scenario, method, seed) the
    largest difference over its figures with the figure it is at."""
    seeds = {k[2] for k in fa} & {k[2] for k in fb}
    fa, fb = ({k: v for k, v in f.items() if k[2] in seeds} for f in (fa, fb))
    only = sorted(set(fa) ^ set(fb), key=str)
    problems = [f"{k[:3]}: {k[3]} only in {'A' if k in fa else 'B'}" for k in only]
    largest: dict[tuple, tuple[float, str]] = {}
    for k in sorted(set(fa) & set(fb), key=str):
        d = difference(fa[k], fb[k])
        if k[:3] not in largest or d > largest[k[:3]][0]:
            largest[k[:3]] = (d, k[3])
    return problems, largest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help=f"largest difference allowed (default {TOLERANCE:g})"
    )
    args = ap.parse_args(argv)
    a, b = load(args.run_a), load(args.run_b)
    problems, macro = compare(a, b)
    print(
        f"splits: {'identical' if not problems else 'DIFFERENT'} ({len(test_patients(a))} method x seed x site test sets in A)"
    )
    for p in problems:
        print(f"  {p}")
    ma, mb = load_metrics(args.run_a), load_metrics(args.run_b)
    if (ma is None) != (mb is None):
        print("metrics.csv in one run only: its rows are not compared")
        ma = mb = None
    fa = {**metric_figures(ma), **study_figures(common_seeds(a, b)[0])}
    fb = {**metric_figures(mb), **study_figures(common_seeds(a, b)[1])}
    missing, largest = compare_figures(fa, fb)
    for p in missing[:20]:
        print(f"  {p}")
    if len(missing) > 20:
        print(f"  ... and {len(missing) - 20} more figures in one run only")
    print(f"{'scenario / method / seed':45s} {'macro AUROC A':>14s} {'B':>8s} {'largest |A - B|':>16s}  at")
    for key, x, y in macro:
        d, where = largest.get(key, (difference(x, y), "macro AUROC"))
        where = where if d > 0 else ""
        print(f"{' / '.join(map(str, key)):45s} {x:14.4f} {y:8.4f} {d:16.2e}  {where}")
    worst = max((d for d, _ in largest.values()), default=0.0)
    n = sum(1 for k in fa if k in fb)
    same = worst <= args.tolerance and not missing
    print(
        f"largest |A - B| over {n} figures of every method: {worst:.2e} ({'within' if same else 'ABOVE'} {args.tolerance:g})"
    )
    return 1 if problems or not same else 0


if __name__ == "__main__":
    raise SystemExit(main())
