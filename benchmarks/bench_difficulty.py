"""How hard is the synthetic benchmark? The default pooled model's study-level AUROC per marker
beside the ceiling (a perfect observer of the truth scored against the readers' labels), and the
same model scored against the truth; expansion beside a marker-count score.

Usage: python -m benchmarks.bench_difficulty [--data data/synthetic] [--experiment default]
       [--method pooled] [--seed 0] [--out runs/bench_difficulty] [--local-steps N]

Trains the experiment's pooled method exactly as ``simulations/simulate.py`` does (same caches,
split, budget and run config) on a dataset written by ``hemexp generate`` (it needs its
``.truth/truth.csv``), then prints one row per label: test studies, reader positives, true
positives, the model's AUROC against the labels, the ceiling, the model as a fraction of the
ceiling, and the model's AUROC against the truth.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.data.dataset import dataset_study_keys
from client.training.evaluate import predict_dataset
from common.config import MARKERS
from common.metrics import roc_auc_per_marker, study_scores
from common.model import build_joint_model
from common.records import model_from_run_config, run_value
from simulations.baselines import pooled
from simulations.experiment import load_experiment
from simulations.runner import full_run_config, iterate_cases, train_rounds
from simulations.synthetic.ceiling import (
    ceiling_table,
    fraction_of_ceiling,
    pseudonym_map,
    read_labels,
    score_against_truth,
    truth_keys,
)
from simulations.synthetic.truth import read_truth


def marker_count_auroc(data_root: Path, keys: list[tuple[str, str, str]]) -> dict[str, float]:
    """AUROC for expansion of the number of markers: the readers' labels, and the truth."""
    truth, labels = read_truth(data_root), read_labels(data_root)
    rows = [k for k in keys if truth[k]["kind"] == "baseline" and labels[k].get("expansion", "") != ""]
    y = np.array([float(labels[k]["expansion"]) for k in rows])
    read = np.array([sum(labels[k][m] == "1" for m in MARKERS) for k in rows], dtype=float)
    true = np.array([sum(truth[k][f"{m}_true"] == "1" for m in MARKERS) for k in rows], dtype=float)
    auc = roc_auc_per_marker(np.stack([y, y], 1), np.stack([read, true], 1), ["labelled", "true"])
    return {f"marker count ({k})": v for k, v in auc.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--experiment", default="default")
    ap.add_argument("--method", default="pooled", help="a pooled method of the experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_difficulty"))
    ap.add_argument("--local-steps", type=int, help="steps per site per round (default: the experiment's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    exp = load_experiment(args.experiment)
    method = next(m for m in exp.methods if m.name == args.method)
    if method.kind != "pooled":
        raise SystemExit(f"{args.method} is a {method.kind} method; pick a pooled one")
    exp = replace(exp, seeds=(args.seed,), methods=(method,), scenarios=exp.scenarios[:1])
    data = args.data.resolve()
    t0 = time.perf_counter()
    case, _ = next(iterate_cases(exp, data, args.out, print))
    t_cache = time.perf_counter() - t0
    rc = full_run_config(exp.method_run_config(method), case.seed)
    model_cfg, _ = model_from_run_config(rc)
    model = build_joint_model(model_cfg, seed=case.seed)
    ds = pooled(case.train)
    steps = args.local_steps or int(run_value(rc, "train.local-steps"))
    train_rounds(model, ds, rc, steps * len(case.train), case.seed)
    t_train = time.perf_counter() - t0 - t_cache
    test = pooled([e.data for e in case.evaluate])
    pred = predict_dataset(model, test)
    studies, scores = study_scores(pred.scores, dataset_study_keys(test))
    keys = truth_keys(studies, pseudonym_map(data))
    names = list(model.output_names)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "study_scores.npz", keys=np.array(keys), scores=scores, names=np.array(names))
    labels = read_labels(data)
    y = np.array([[float(labels[k][n]) if labels[k].get(n, "") != "" else np.nan for n in names] for k in keys])
    model_auc = roc_auc_per_marker(y, scores, names)
    ceiling = ceiling_table(data, keys)
    marker_cols = [n for n in names if n in MARKERS]
    vs_truth = score_against_truth(data, keys, {m: scores[:, names.index(m)] for m in marker_cols})
    print(
        f"\n{exp.name}/{method.name}, seed {case.seed}, {steps} steps x {len(case.train)} sites per round: "
        f"{len(keys)} test studies "
        f"(caches {t_cache:.0f} s, training {t_train:.0f} s)\n"
    )
    head = f"{'label':18s} {'n':>4s} {'pos':>4s} {'true+':>5s} {'model':>6s} {'ceiling':>7s} {'share':>6s} {'vs truth':>8s}"
    print(head + "\n" + "-" * len(head))
    rows = {}
    for n in (*MARKERS, "expansion"):
        c = ceiling[n]
        auc = model_auc.get(n, float("nan"))
        rows[n] = {
            **c,
            "model": auc,
            "fraction_of_ceiling": fraction_of_ceiling(auc, c["ceiling"]),
            "model_vs_truth": vs_truth.get(n, float("nan")),
        }
        r = rows[n]
        print(
            f"{n:18s} {c['n']:4d} {c['positives']:4d} {c['true_positives']:5d} {auc:6.3f} {c['ceiling']:7.3f} "
            f"{r['fraction_of_ceiling']:6.2f} {r['model_vs_truth']:8.3f}"
        )
    counts = marker_count_auroc(data, keys)
    for k, v in counts.items():
        print(f"expansion by {k}: AUROC {v:.3f}")
    (args.out / "difficulty.json").write_text(json.dumps({"rows": rows, "marker_count": counts}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
