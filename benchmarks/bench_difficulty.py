"""How hard is the synthetic benchmark? An experiment's pooled model's study AUROC per label beside
the ceiling (the upper bound: an observer of the readers' evidence scored against their labels) and
a perfect observer of the true severity, the same model
scored against the truth, and expansion beside a marker-count score.

Usage: python -m benchmarks.bench_difficulty [--data data/synthetic] [--experiment default]
       [--method pooled] [--seed 0] [--local-steps N] [--rounds STAGE1 STAGE2] [--device auto]
       [--boot 2000] [--out runs/bench_difficulty] [--results FILE.md]

Runs one method of the experiment (its first scenario, one seed) through the simulation's own
runner (``simulations.runner.Runner``: same caches, split, budget, run config and model choice on
validation as ``simulations/simulate.py``), optionally with a larger budget, on a dataset written
by ``hemexp generate`` (it needs its ``.truth/truth.csv``), then prints the report's ceiling table
(``simulations.report.ceiling_section``): per label the test baselines, reader and true positives,
the model's AUROC [95 % CI], the ceiling, the truth observer, the share of the ceiling and the AUROC
against the truth [95 % CI].
``OUT/difficulty.json`` keeps the rows and the marker-count AUROCs; ``--results FILE.md`` also writes
them as markdown with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.config import MARKERS
from common.runtime import use_torch_threads
from common.study_metrics import auroc
from simulations.experiment import Experiment, Method, load_experiment
from simulations.report.ceiling_section import ceiling_tables, console, markdown
from simulations.report.files import json_safe
from simulations.runner import Runner, iterate_cases
from simulations.synthetic.ceiling import pseudonym_map, read_labels, truth_keys
from simulations.synthetic.truth import TruthKey, read_truth, truth_path

#: Method kinds the runner trains in this process (no Flower engine needed).
IN_PROCESS = ("pooled", "local")


def marker_count_auroc(data_root: Path, keys: list[TruthKey]) -> dict[str, float]:
    """AUROC for expansion of the number of markers: the readers' labels, and the truth."""
    truth, labels = read_truth(data_root), read_labels(data_root)
    rows = [k for k in keys if truth[k]["kind"] == "baseline" and labels[k].get("expansion", "") != ""]
    y = np.array([float(labels[k]["expansion"]) for k in rows])
    read = np.array([sum(labels[k][m] == "1" for m in MARKERS) for k in rows], dtype=float)
    true = np.array([sum(truth[k][f"{m}_true"] == "1" for m in MARKERS) for k in rows], dtype=float)
    return {"marker count (labelled)": auroc(y, read), "marker count (true)": auroc(y, true)}


def one_run(exp: Experiment, name: str, seed: int, local_steps: int | None, rounds: list[int] | None) -> Experiment:
    """The experiment cut to one method, its first scenario and one seed, with the budget's
    overrides; an error names the methods that can run here."""
    runnable = [m.name for m in exp.methods if m.kind in IN_PROCESS]
    method: Method | None = next((m for m in exp.methods if m.name == name), None)
    if method is None or method.kind not in IN_PROCESS:
        raise ValueError(f"experiment {exp.name}: {name!r} is not a pooled or local method; choose from {runnable}")
    budget = exp.budget
    if local_steps is not None:
        budget = replace(budget, local_steps=local_steps)
    if rounds is not None:
        budget = replace(budget, rounds_stage1=rounds[0], rounds_stage2=rounds[1])
    return replace(exp, seeds=(seed,), methods=(method,), scenarios=exp.scenarios[:1], budget=budget)


def results_markdown(
    title: str, data: Path, tables: dict[str, list], counts: dict[str, float], argv: list[str] | None
) -> str:
    """The run's tables as a markdown file, headed by the command and the dataset that made them."""
    described = json.loads((data / "dataset.json").read_text()) if (data / "dataset.json").is_file() else {}
    facts = ", ".join(f"{k} {described[k]}" for k in ("seed", "matrix", "studies_scale") if k in described)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    parts = [
        "# How hard is the synthetic benchmark? (written by benchmarks/bench_difficulty.py)\n",
        f"Command: `python -m benchmarks.bench_difficulty {args}`; data `{data.name}` ({facts}).\n",
        f"{title}.\n",
        *(markdown(rows, scenario) for scenario, rows in tables.items()),
        "",
        *(f"- expansion by {k}: AUROC {v:.3f}" for k, v in counts.items()),
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/synthetic"), help="written by hemexp generate")
    ap.add_argument("--experiment", default="default", help="a bundled experiment's name or a TOML file")
    ap.add_argument("--method", default="pooled", help="a pooled (or local) method of the experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local-steps", type=int, help="steps per site per round (default: the experiment's)")
    ap.add_argument("--rounds", type=int, nargs=2, metavar=("STAGE1", "STAGE2"), help="rounds per stage")
    ap.add_argument("--device", default="auto", help="where the model trains and is scored (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates of the intervals")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_difficulty"))
    ap.add_argument("--results", type=Path, help="also write the tables as markdown here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not truth_path(data).is_file():
        raise SystemExit(f"{truth_path(data)}: no truth (give --data a folder written by hemexp generate)")
    try:
        exp = one_run(load_experiment(args.experiment), args.method, args.seed, args.local_steps, args.rounds)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {exc}") from None
    use_torch_threads(args.threads)
    t0 = time.perf_counter()
    runner = Runner(exp, args.out, print, device=args.device)
    case, _ = next(iterate_cases(exp, data, args.out, print))
    t_cache = time.perf_counter() - t0
    runner.run_method(case, exp.methods[0])
    t_train = time.perf_counter() - t0 - t_cache
    tables = ceiling_tables(data, runner.results.studies, args.boot, seed=args.seed)
    b = exp.budget
    title = (
        f"{exp.name}/{exp.methods[0].name}, seed {case.seed}, {b.rounds_stage1} + {b.rounds_stage2} rounds x "
        f"{b.local_steps} steps x {len(case.train)} sites (caches {t_cache:.0f} s, training and scoring "
        f"{t_train:.0f} s)"
    )
    print(f"\n{title}\n")
    for scenario, rows in tables.items():
        print(console(rows, scenario))
    studies = np.concatenate([e["outputs"].studies for e in runner.results.studies])
    counts = marker_count_auroc(data, truth_keys(studies, pseudonym_map(data)))
    for k, v in counts.items():
        print(f"expansion by {k}: AUROC {v:.3f}")
    if args.results is not None:
        args.results.write_text(results_markdown(title, data, tables, counts, argv))
        print(f"wrote {args.results}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"experiment": exp.name, "method": exp.methods[0].name, "seed": case.seed, "budget": b.run_config()}
    doc |= {"ceiling": tables, "marker_count": counts, "seconds": {"caches": t_cache, "training": t_train}}
    (args.out / "difficulty.json").write_text(json.dumps(json_safe(doc), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
