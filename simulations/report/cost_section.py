"""The report's round-cost section: per federated method and stage (1, gan, 2), the seconds a round
took and the payload bytes each site sent and received per round, read from the run's
``history.json`` (``server.federation``: ``seconds`` and ``bytes`` of every round).

Why a section of its own: the federated GAN stage (docs/gan.md design (i)) is judged by what it adds
to a run beside the other stages, and that is measured on the real Flower run, not estimated.
``python -m simulations.report.cost_section RUN_DIR`` prints the table of an existing simulation
output folder (every ``federated/*/history.json`` in it) as markdown.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.experiment import Experiment, federated_run_name, load_experiment
from simulations.report.sections import Paragraph, Section, Table

#: Column order of the table; a stage's label in ``history.json`` (1, "gan", 2) shown as a string.
STAGE_ORDER = ("1", "gan", "2")

NOTE = (
    "Per federated method and stage: rounds per run, seconds per round (the server's wall time of the "
    "round, on this machine's simulation engine: the virtual sites share its cores, so a deployment's "
    "sites, in parallel on their own machines, take the slowest site's time instead), and payload "
    "bytes per site per round (arrays, keys and 8 bytes a number, every exchange of the round: "
    "training, evaluation, counts; no gRPC framing), mean over the sites, rounds and seeds."
)


def stage_costs(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per stage of a run's ``history.json``: rounds, mean seconds per round and mean payload
    bytes sent to and received from a site per round (mean over the round's sites, then rounds)."""
    by_stage: dict[str, list[Mapping[str, Any]]] = {}
    for r in history.get("rounds", []):
        by_stage.setdefault(str(r["stage"]), []).append(r)
    rows = []
    for stage in sorted(by_stage, key=_stage_rank):
        rounds = by_stage[stage]
        rows.append(
            {
                "stage": stage,
                "rounds": len(rounds),
                "seconds": _mean(r.get("seconds") for r in rounds),
                "sent": _mean(_site_mean(r, "sent") for r in rounds),
                "received": _mean(_site_mean(r, "received") for r in rounds),
            }
        )
    return rows


def _stage_rank(stage: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(stage), stage) if stage in STAGE_ORDER else (len(STAGE_ORDER), stage)


def _site_mean(round_entry: Mapping[str, Any], direction: str) -> float | None:
    values = [b[direction] for b in round_entry.get("bytes", {}).values() if direction in b]
    return float(np.mean(values)) if values else None


def _mean(values: Iterable[float | None]) -> float:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def over_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``{scenario, method, seed, stage, rounds, seconds, sent, received}`` averaged over seeds,
    one per scenario, method and stage (first-seen order of methods, stages in schedule order)."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["method"], r["stage"]), []).append(r)
    runs = list(dict.fromkeys(key[:2] for key in groups))  # (scenario, method) in first-seen order
    keys = sorted(groups, key=lambda key: (runs.index(key[:2]), _stage_rank(key[2])))
    return [
        {
            "scenario": scenario,
            "method": method,
            "stage": stage,
            "seeds": len(groups[(scenario, method, stage)]),
            **{
                k: _mean(g[k] for g in groups[(scenario, method, stage)])
                for k in ("rounds", "seconds", "sent", "received")
            },
        }
        for scenario, method, stage in keys
    ]


HEADER = ["scenario", "method", "stage", "rounds", "seconds per round", "kB sent per site", "kB received per site"]


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The cells of ``over_seeds``' rows (kB = 1000 bytes)."""
    return [
        [
            r["scenario"],
            r["method"],
            r["stage"],
            f"{r['rounds']:g}",
            f"{r['seconds']:.1f}",
            f"{r['sent'] / 1e3:.1f}",
            f"{r['received'] / 1e3:.1f}",
        ]
        for r in rows
    ]


def cost_section(rows: Sequence[Mapping[str, Any]]) -> Section | None:
    """The section; None without a federated run."""
    if not rows:
        return None
    return Section(
        "Round cost per stage (federated methods)", [Paragraph(NOTE), Table(HEADER, table_rows(over_seeds(rows)))]
    )


def write_costs(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Section | None:
    """``round_cost.json`` (per run and averaged over seeds) and the report's section."""
    if not rows:
        return None
    doc = {"note": NOTE, "runs": list(rows), "mean_over_seeds": over_seeds(rows)}
    (out_dir / "round_cost.json").write_text(json.dumps(doc, indent=1))
    return cost_section(rows)


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """``over_seeds``' table as markdown."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(over_seeds(rows))]
    return "\n".join(lines)


def runs_of(run_dir: Path, experiment: Experiment | None = None) -> list[dict[str, Any]]:
    """Every federated run of a simulation output folder, as stage rows. Labelled by scenario and
    method where ``experiment`` (the run's, e.g. its ``experiment.toml``) names a run's folder, else
    by the folder's name less the output folder's (the seed is the folder's ``-s<N>`` suffix)."""
    run_dir = Path(run_dir)
    names = {
        federated_run_name(run_dir.name, sc.name, m.name, seed): (sc.name, m.name)
        for sc in (experiment.scenarios if experiment else ())
        for m in experiment.methods
        for seed in experiment.seeds
    }
    rows = []
    for path in sorted(run_dir.glob("federated/*/history.json")):
        folder = path.parent.name
        stem, _, seed = folder.rpartition("-s")
        scenario, method = names.get(folder, ("", stem.removeprefix(f"{run_dir.name}-")))
        for row in stage_costs(json.loads(path.read_text())):
            rows.append({"scenario": scenario, "method": method, "seed": seed, **row})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a simulate.py output folder (OUT/<experiment>-<timestamp>)")
    parser.add_argument("--experiment", help="the run's experiment, to name its methods (default: its experiment.toml)")
    args = parser.parse_args(argv)
    toml = args.run_dir / "experiment.toml"
    experiment = (
        load_experiment(args.experiment) if args.experiment else load_experiment(toml) if toml.is_file() else None
    )
    rows = runs_of(args.run_dir, experiment)
    if not rows:
        raise SystemExit(f"{args.run_dir}: no federated/*/history.json in it")
    print(markdown(rows))


if __name__ == "__main__":
    main()
