"""Model selection through the secure validation sum against plain totals, on a federated benchmark run.

Issue 27 item 4 moved every site's validation sums into the pairwise-mask secure sum
(``server.secure_validation``): the server now chooses from totals it decodes, never from the sites'
plain sums. This checks on a real run that the choice did not change. It takes a ``simulate.py``
federated run (``OUT/<run>/federated/<name>``: its round checkpoints and ``best.pt``) and the experiment
it ran; scores every round checkpoint that carries a validation choice on every site's validation
studies in this process (one torch thread and the run's evaluation batch, as a site scores), adds the
sums in site order as the server did before (the plain totals), and compares with what the server chose
from the secure totals: each round's score, every marker's temperature and threshold, and best.pt's round.

Run: ``python -m benchmarks.bench_secure_validation RUN_DIR --experiment EXPERIMENT [--method NAME]
[--out FILE]``; exit status 1 when a round's choice or best.pt differs. ``--out`` also writes the
output with the command and commit (``benchmarks/results/secure_validation.txt``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from client.federation.node import SiteNode
from client.federation.site_data import open_site
from client.federation.site_run import SiteRunConfig
from client.simulation.partitions import read_partitions
from client.training.evaluate import evaluate
from common.checkpoint import build_from_checkpoint, load_checkpoint
from common.config import LABELS
from common.validation import ValidationStats, calibration_meta, selection_score
from server.checkpoints import round_checkpoints
from simulations.experiment import load_experiment
from simulations.report.files import environment
from simulations.runner import full_run_config


def plain_totals(run_dir: Path, experiment: str, method_name: str | None) -> dict[int, ValidationStats]:
    """round -> the sites' validation sums of that round's checkpoint, added in site order."""
    exp = load_experiment(experiment)
    method = next(m for m in exp.methods if m.kind == "federated" and method_name in (None, m.name))
    manifest = run_dir.parent / f"{run_dir.name}.partitions.json"
    checkpoints = [p for p in round_checkpoints(run_dir) if "thresholds" in load_checkpoint(p).meta]
    seed = int(load_checkpoint(checkpoints[0]).meta["seed"])
    overrides = {**exp.method_run_config(method), "data.partitions": str(manifest), "output.name": run_dir.name}
    rc = full_run_config(overrides, seed)
    run = SiteRunConfig.from_run_config(rc)
    n_sites = len(read_partitions(manifest))
    sites = [
        SiteNode.from_context(
            Context(run_id=0, node_id=i, node_config={"partition-id": i}, state=RecordDict(), run_config=rc),
            run.config.data,
        )
        for i in range(n_sites)
    ]
    splits = sorted(((s.site_id, open_site(s, run).val) for s in sites), key=lambda x: x[0])
    out = {}
    for path in checkpoints:
        ckpt = load_checkpoint(path)
        model = build_from_checkpoint(ckpt)
        parts = []
        for _, val in splits:
            scores = evaluate(model, val, "cpu", run.eval_batch_size)
            parts.append(
                ValidationStats.from_outputs(scores["arrays"]["studies"], scores["arrays"]["dice_counts"].values())
            )
        out[int(ckpt.meta["round"])] = sum(parts[1:], parts[0])
    return out


def compare(run_dir: Path, totals: dict[int, ValidationStats], say: Callable[[str], None] = print) -> bool:
    """Each round's secure and plain choice side by side (to ``say``); True when they agree everywhere."""
    ok = True
    scores = {}
    for path in round_checkpoints(run_dir):
        meta = load_checkpoint(path).meta
        rnd = int(meta["round"])
        if rnd not in totals:
            continue
        names = list(meta["temperature"])
        markers = [c for c, n in enumerate(names) if n != LABELS[-1]]
        plain = calibration_meta(totals[rnd], names, float(meta.get("target_sensitivity", 0.0)))
        score = selection_score(totals[rnd], int(meta["stage"]), markers)
        scores[rnd] = score
        same_t = plain["temperature"] == meta["temperature"]
        same_th = plain["thresholds"] == meta["thresholds"]
        secure_score = meta["validation"]["score"]
        same_s = (math.isnan(score) and secure_score is None) or secure_score == score
        ok &= same_t and same_th and same_s
        say(
            f"round {rnd}: score secure {_fmt(secure_score)} plain {_fmt(score)}"
            f" | temperatures {'equal' if same_t else 'DIFFER'} | thresholds {'equal' if same_th else 'DIFFER'}"
            f" | sites {meta['validation']['sites']}"
        )
        say(f"  temperature {_fmts(meta['temperature'])}; threshold {_fmts(meta['thresholds'])}")
        if not (same_t and same_th):
            say(
                f"  secure {meta['temperature']} {meta['thresholds']}\n  plain  {plain['temperature']} {plain['thresholds']}"
            )
    usable = {r: s for r, s in scores.items() if not math.isnan(s)}
    best_plain = max(usable, key=lambda r: (usable[r], -r)) if usable else None
    best = run_dir / "best.pt"
    best_secure = int(load_checkpoint(best).meta["round"]) if best.is_file() else None
    say(f"best.pt: secure round {best_secure}, plain totals choose round {best_plain}")
    return ok and best_plain == best_secure


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.6f}"


def _fmts(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a simulate.py federated run: OUT/<run>/federated/<name>")
    ap.add_argument("--experiment", required=True, help="the experiment it ran (a bundled name or a TOML file)")
    ap.add_argument("--method", default=None, help="the federated method's name (default: the first)")
    ap.add_argument("--out", type=Path, default=None, help="also write the output here, with command and commit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as a site's ClientApp scores: the same float sums, so the same bins
    t0 = time.perf_counter()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    totals = plain_totals(args.run_dir, args.experiment, args.method)
    ok = compare(args.run_dir, totals, say)
    say(f"{'same choice' if ok else 'CHOICE DIFFERS'} ({time.perf_counter() - t0:.0f} s)")
    if args.out:
        env = environment()
        command = " ".join(
            ["python -m benchmarks.bench_secure_validation", *(argv if argv is not None else sys.argv[1:])]
        )
        args.out.write_text(
            f"# {command}\n# commit {env['git_commit'][:10]}{' + local changes' if env['git_dirty'] else ''}\n"
            + "\n".join(lines)
            + "\n"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
