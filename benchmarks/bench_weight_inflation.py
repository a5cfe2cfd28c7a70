"""Weight inflation: one site claims 1000x its training slices; FedAvg without and with the bound.

Runs the ``weight_inflation`` experiment (simulations/experiments/weight_inflation.toml) as
``simulate.py`` does, then writes one table from the report's own files: per scenario and method,
the slice-level macro-AUC / Dice (mean over sites, ``metrics.json`` summary) and the inflating
site's share of FedAvg's weight in each train round, claimed and as weighted (each run's
``history.json``: ``train.sites`` and ``capped``).

    hemexp generate --out /tmp/wi-data --sites 4 --scale 0.5 --matrix 64
    python -m benchmarks.bench_weight_inflation --data /tmp/wi-data
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common.records import NUM_EXAMPLES
from simulations.experiment import load_experiment
from simulations.simulate import run_experiment

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "weight_inflation"


def weight_shares(history: dict[str, Any], site: str) -> list[tuple[float, float]]:
    """Per train round: ``site``'s share of the claimed num-examples and of the weights FedAvg used
    (a capped site's weight is the bound the server recorded)."""
    out = []
    for entry in history["rounds"]:
        claimed = {s: float(m.get(NUM_EXAMPLES) or 0) for s, m in entry["train"].get("sites", {}).items()}
        if site not in claimed or not sum(claimed.values()):
            continue
        used = {**claimed, **{c["site"]: float(c["weight"]) for c in entry.get("capped", [])}}
        out.append((claimed[site] / sum(claimed.values()), used[site] / sum(used.values())))
    return out


def table(report_dir: Path) -> str:
    """The markdown table of one run of the experiment, from its ``metrics.json`` and histories."""
    doc = json.loads((report_dir / "metrics.json").read_text())
    lines = [
        "| scenario | method | slice macro-AUC / Dice | inflating site's share of the weight per round: claimed -> used |",
        "|---|---|---|---|",
    ]
    for row in doc["summary"]:
        scenario, method = row["scenario"], row["method"]
        bad = [s["site"] for s in doc["sites"].get(scenario, []) if s.get("fault")]
        history = report_dir / "federated" / f"{report_dir.name}-{scenario}-{method}-s0" / "history.json"
        shares = weight_shares(json.loads(history.read_text()), bad[0]) if bad and history.is_file() else []
        share = ", ".join(f"{c:.3f} -> {u:.3f}" for c, u in shares) or "(no inflating site)"
        figures = f"{row['macro_auc_slice']:.3f} / {row['dice']:.3f}"
        lines.append(f"| {scenario} | {method} | {figures} | {share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="site folders (hemexp generate --out ...)")
    ap.add_argument("--out", type=Path, default=None, help="where the simulation report goes (default: a temp folder)")
    ap.add_argument("--md", type=Path, default=REPO / "benchmarks" / "results" / "weight_inflation.md")
    args = ap.parse_args()
    exp = load_experiment(EXPERIMENT)
    out = args.out or Path(tempfile.mkdtemp(prefix="weight-inflation-"))
    t0 = time.perf_counter()
    report = run_experiment(exp, args.data, out, generate=False, experiment_text=Path(exp.source).read_text())
    seconds = time.perf_counter() - t0
    sites = len(
        {s["site"] for v in json.loads((report.parent / "metrics.json").read_text())["sites"].values() for s in v}
    )
    text = (
        f"# Weight inflation: FedAvg without and with the num-examples bound\n\n"
        f"    python -m benchmarks.bench_weight_inflation --data {args.data}    # {seconds:.0f} s\n\n"
        f"{exp.description} {sites} natural sites of `{args.data}`, budget {exp.budget.__dict__}, seed 0. "
        "The inflating site is the first site; it trains honestly. Bound: `strategy.max-examples-factor` "
        "(0 = none, 10 = at most 10x the other sites' median claim, and at most what the site declared in "
        "the counts round; docs/robustness.md).\n\n"
        f"{table(report.parent)}\n"
    )
    args.md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
