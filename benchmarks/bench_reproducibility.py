"""Two runs of the same experiment (e.g. on two fresh clones): the same test patients, the same figures?

Compares the ``studies.json`` of two ``simulate.py`` reports, seed by seed (only the seeds both ran):

- splits: per method, seed and site, the set of test patients (``StudyOutputs.patients``, keys that
  are the same on every copy of the data whatever the pseudonym key) must be identical;
- figures: per method and seed, the study-level macro AUROC (calibrated logits, sites pooled, the
  headline's statistic without its interval), and the largest difference between the two runs.

Run: ``python -m benchmarks.bench_reproducibility RUN_DIR_A RUN_DIR_B``; exit status 1 when a split differs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.study_metrics import macro_auroc
from simulations.report.studies import from_json, marker_columns, pooled


def load(run_dir: Path) -> list[dict]:
    return from_json(json.loads((run_dir / "studies.json").read_text()))


def test_patients(entries: Sequence[dict]) -> dict[tuple, frozenset[str]]:
    """(scenario, method, seed, site) -> its test patients."""
    return {(e["scenario"], e["method"], e["seed"], e["site"]): frozenset(e["outputs"].patients) for e in entries}


def macro_per_seed(entries: Sequence[dict]) -> dict[tuple, float]:
    """(scenario, method, seed) -> study-level macro AUROC over the markers, sites pooled."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["scenario"], e["method"], e["seed"]), []).append(e)
    out = {}
    for key, group in groups.items():
        o = pooled(group, "calibrated")
        cols = marker_columns(o)
        out[key] = float(macro_auroc(o.labels[:, cols], o.logits[:, cols]))
    return out


def compare(a: Sequence[dict], b: Sequence[dict]) -> tuple[list[str], list[tuple[tuple, float, float]]]:
    """Split differences (as text) and (key, figure A, figure B) for the seeds both runs hold."""
    seeds = {e["seed"] for e in a} & {e["seed"] for e in b}
    a = [e for e in a if e["seed"] in seeds]
    b = [e for e in b if e["seed"] in seeds]
    pa, pb = test_patients(a), test_patients(b)
    problems = [f"{k}: only in one run" for k in sorted(set(pa) ^ set(pb), key=str)]
    problems += [
        f"{k}: {len(pa[k] ^ pb[k])} test patient(s) differ"
        for k in sorted(set(pa) & set(pb), key=str)
        if pa[k] != pb[k]
    ]
    fa, fb = macro_per_seed(a), macro_per_seed(b)
    return problems, [(k, fa[k], fb[k]) for k in sorted(set(fa) & set(fb), key=str)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args(argv)
    problems, figures = compare(load(args.run_a), load(args.run_b))
    splits = len(test_patients(load(args.run_a)))
    print(f"splits: {'identical' if not problems else 'DIFFERENT'} ({splits} method x seed x site test sets in A)")
    for p in problems:
        print(f"  {p}")
    print(f"{'scenario / method / seed':45s} {'macro AUROC A':>14s} {'B':>8s} {'|A - B|':>8s}")
    for key, x, y in figures:
        print(f"{' / '.join(map(str, key)):45s} {x:14.4f} {y:8.4f} {abs(x - y):8.4f}")
    if figures:
        print(f"largest |A - B|: {max(abs(x - y) for _, x, y in figures if np.isfinite(x - y)):.4f}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
