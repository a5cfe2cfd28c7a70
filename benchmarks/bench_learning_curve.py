"""Learning curves: validation macro study AUROC against crop presentations and seconds, per method.

Runs an experiment (default ``learning_curve``: the ROI and the whole-slice classifier, pooled and
federated) through ``simulations.simulate.run_experiment`` and reads every stage-2 round's pooled
validation score (``validation_curve.json``: the score the federation chooses rounds by, from all
sites' validation patients) beside the budget's cumulative slices seen. Writes a figure and a
markdown table (with the command and commit) next to ``--results``; the test patients' study table
of the chosen rounds is the simulation's own (``--results`` of simulate.py, appended).

Usage: python -m benchmarks.bench_learning_curve [--experiment learning_curve] [--seeds 0 1 2]
           [--results benchmarks/results/learning_curve.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from simulations.experiment import Experiment, load_experiment


def presentations(exp: Experiment, stage_round: int, n_sites: int) -> int:
    """Slices (crops) the method's classifier has seen after ``stage_round`` stage-2 rounds: the budget's
    steps x batch x sites (a pooled model sees the sites' share together, as the federation does)."""
    budget = exp.budget
    steps = budget.local_steps_stage2 or budget.local_steps
    batch = budget.batch_size_stage2 or budget.batch_size
    return stage_round * steps * batch * n_sites


def curve_table(rows: list[dict], exp: Experiment, n_sites: int) -> list[dict]:
    """Mean over seeds per method and stage-2 round: score, seconds, presentations."""
    stage1 = exp.budget.rounds_stage1
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["stage"] == 2]
        for rnd in sorted({r["round"] for r in mine}):
            at = [r for r in mine if r["round"] == rnd]
            k = rnd - stage1
            out.append(
                {
                    "method": method,
                    "stage2_round": k,
                    "presentations": presentations(exp, k, n_sites),
                    "seconds": float(np.mean([r["seconds"] for r in at])),
                    "score": float(np.nanmean([r["score"] for r in at])),
                    "seeds": len(at),
                }
            )
    return out


def markdown(table: list[dict], command: str, commit: str) -> str:
    lines = [
        "| method | stage-2 round | crops seen | seconds (method start) | validation macro study AUROC |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['method']} | {r['stage2_round']} | {r['presentations']:,} | {r['seconds']:.0f} | {r['score']:.3f} |"
        for r in table
    ]
    lines.append(f"\nWritten by `{command}` at commit {commit}.\n")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for method in dict.fromkeys(r["method"] for r in table):
        mine = [r for r in table if r["method"] == method]
        axes[0].plot([r["presentations"] for r in mine], [r["score"] for r in mine], marker="o", label=method)
        axes[1].plot([r["seconds"] for r in mine], [r["score"] for r in mine], marker="o", label=method)
    axes[0].set_xlabel("crops (slices) seen in stage 2")
    axes[1].set_xlabel("seconds since the method started (2 cores)")
    axes[0].set_ylabel("validation macro study AUROC")
    for ax in axes:
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="learning_curve")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--data", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--out", type=Path, default=Path("runs"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/learning_curve.md"))
    args = ap.parse_args(argv)
    from simulations.simulate import run_experiment

    exp = load_experiment(args.experiment)
    if args.seeds:
        exp = replace(exp, seeds=tuple(args.seeds))
    report = run_experiment(exp, args.data, args.out, results_file=args.results)
    rows = json.loads((report.parent / "validation_curve.json").read_text())
    n_sites = len([p for p in args.data.glob("site-*") if p.is_dir()])
    table = curve_table(rows, exp, n_sites)
    figure = plot(table, args.results.with_suffix(".png"))
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python -m benchmarks.bench_learning_curve " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        args.results.read_text()
        + f"\n## Learning curves ({figure.name})\n\n"
        + markdown(table, command.strip(), commit)
    )
    args.results.write_text(text)
    print(markdown(table, command.strip(), commit))
    print(f"wrote {args.results} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
