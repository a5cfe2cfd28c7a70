"""The default simulation's wall time, CPU time and peak memory, and Flower's share of its federated part.

1. Runs ``simulate.py``'s experiment (``default`` unless ``--experiment``) exactly as the README's
   first command does, timing it whole and per method, while a thread samples the resident memory
   of this process and every process it starts (SuperLink, SuperExec, Ray workers, ClientApps), and
   per method the machine's busy CPU seconds beside the wall seconds (``common.runtime.machine_cpu_seconds``;
   run it alone): their ratio is the cores the method kept busy, to read beside its thread plan (the
   baselines: one process of ``--threads``; a federation: one thread per Ray worker, one worker per
   core). More threads than cores would show as CPU seconds that buy no wall time.
2. For each federated method of a natural-site scenario, the same local work without Flower
   (``bench_federation.local_equivalent``: every site trains the same steps with the same configs
   and seeds and evaluates the global model every round, averaging in numpy), and the ratio.

    python -m benchmarks.bench_simulate                       # data/synthetic, generated if missing
    python -m benchmarks.bench_simulate --data /tmp/demo --json benchmarks/results/simulate_default.json
    python -m benchmarks.bench_simulate --no-flower-ratio --results benchmarks/results/simulate_cpu.md
    python -m benchmarks.bench_simulate --from-run runs/default-<timestamp> --results benchmarks/results/simulate_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_federation import local_equivalent, write_figures
from common.runtime import torch_threads, usable_cores
from simulations.experiment import load_experiment
from simulations.report.files import environment
from simulations.report.tables import text_summary
from simulations.runner import full_run_config
from simulations.simulate import run_experiment

REPO = Path(__file__).resolve().parents[1]

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (read from /proc)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [c for c, p in parent.items() if p == pid]
    return total


class PeakMemory:
    def __init__(self, interval: float = 0.5) -> None:
        self.peak, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def thread_plan(exp, method_name: str, threads: int) -> str:
    """How many torch threads a method runs at once: the baselines one process of ``threads``
    (``simulate.py --threads``), a federation one thread per Ray worker and one worker per core
    (``simulations.engine.SimulationEngine`` defaults), the radiomics baseline one process."""
    method = next(m for m in exp.methods if m.name == method_name)
    if method.needs_engine:
        cores = usable_cores()
        return f"{cores} worker(s) x 1 thread"
    return f"1 process x {torch_threads(threads)} thread(s)"


def cpu_rows(timings: list[dict], exp, threads: int) -> list[dict]:
    """Per method and seed: wall seconds, the machine's busy CPU seconds, their ratio, the thread plan."""
    return [
        {
            "scenario": t["scenario"],
            "method": t["method"],
            "seed": t["seed"],
            "wall_s": t["seconds"],
            "cpu_s": t["cpu_seconds"],
            "busy_cores": t["cpu_seconds"] / t["seconds"] if t["seconds"] > 0 else float("nan"),
            "threads": thread_plan(exp, t["method"], threads),
        }
        for t in timings
    ]


def cpu_table(rows: list[dict], cores: int) -> str:
    """The rows as a fixed-width table (console and ``--results``)."""
    head = f"{'scenario':12s} {'method':24s} {'seed':>4s} {'wall s':>7s} {'CPU s':>7s} {'busy cores':>10s}  threads"
    lines = [head] + [
        f"{r['scenario']:12s} {r['method']:24s} {r['seed']:4d} {r['wall_s']:7.0f} {r['cpu_s']:7.0f} "
        f"{r['busy_cores']:10.2f}  {r['threads']}"
        for r in rows
    ]
    return "\n".join(lines + [f"(busy cores: the machine's CPU seconds / wall seconds, of {cores} usable)"])


def table_of_run(run_dir: Path, threads: int, results: Path | None) -> int:
    """The per-method wall/CPU table of a finished run (its ``experiment.toml`` and ``metrics.json``)."""
    exp = load_experiment(run_dir / "experiment.toml")
    doc = json.loads((run_dir / "metrics.json").read_text())
    env = doc.get("environment", {})
    table = cpu_table(cpu_rows(doc["timings"], exp, threads), usable_cores())
    print(table)
    if results:
        commit = str(env.get("git_commit", ""))[:10]
        results.write_text(
            f"# {exp.name}: wall and CPU time per method\n\nFrom the run `{run_dir.name}` (commit {commit}, "
            f"`{env.get('command', 'simulate.py')}`), tabled by `python -m benchmarks.bench_simulate --from-run "
            f"{run_dir.name}`; CPU = the machine's busy CPU seconds during the method.\n\n```\n{table}\n```\n"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    p.add_argument("--experiment", default="default")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--results", type=Path, help="also write the per-method wall/CPU table here as markdown")
    p.add_argument("--no-flower-ratio", action="store_true", help="skip step 2 (the same work without Flower)")
    p.add_argument(
        "--threads", type=int, default=0, help="simulate.py's --threads (default %(default)s, the usable cores)"
    )
    p.add_argument(
        "--from-run",
        type=Path,
        metavar="RUN_DIR",
        help="print the wall/CPU table of a finished simulate.py run (its metrics.json) instead of running one",
    )
    args = p.parse_args(argv)
    if args.from_run is not None:
        return table_of_run(args.from_run, args.threads, args.results)
    exp = load_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            report = run_experiment(
                exp,
                args.data,
                Path(tmp),
                log=lambda s: None,
                generate=args.data == REPO / "data" / "synthetic",
                experiment_text=Path(exp.source).read_text(),
                threads=args.threads,
            )
        wall = time.perf_counter() - t0
        doc = json.loads((report.parent / "metrics.json").read_text())
        print(text_summary(doc["summary"], doc["rows"]) + "\n")
    figures = {
        "experiment": exp.name,
        "cpus": os.cpu_count(),
        "wall_s": wall,
        "peak_rss_mb": mem.peak / 2**20,
        "methods": {t["method"]: t["seconds"] for t in doc["timings"]},
        "cpu": cpu_rows(doc["timings"], exp, args.threads),
        "flower_ratio": {},
    }
    print(
        f"{exp.name}: {wall:.0f} s wall on {os.cpu_count()} CPU(s), peak memory {mem.peak / 2**20:.0f} MB "
        "(this process and everything it started)"
    )
    table = cpu_table(figures["cpu"], usable_cores())
    print(table)
    if args.results:
        env = environment()
        args.results.write_text(
            f"# {exp.name}: wall and CPU time per method\n\nWritten by `python -m benchmarks.bench_simulate "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}` at commit {env['git_commit'][:10]}"
            f"{' + local changes' if env['git_dirty'] else ''} on {usable_cores()} usable core(s), "
            f"{wall:.0f} s in all.\n\n```\n{table}\n```\n"
        )
    if args.no_flower_ratio:
        write_figures(args.json, figures)
        return 0
    natural = [s.name for s in exp.scenarios if s.split == "natural" and not s.leave_out and not s.bad_sites]
    for method in (m for m in exp.methods if m.kind == "federated"):
        fed = [t["seconds"] for t in doc["timings"] if t["method"] == method.name and t["scenario"] in natural]
        if not fed:
            continue
        rc = {**full_run_config(exp.method_run_config(method), exp.seeds[0]), "data.root": str(args.data.resolve())}
        from simulations.sites import discover_sites

        local = local_equivalent(rc, len(discover_sites(args.data)))
        ratio = fed[0] / local["total_s"]
        figures["flower_ratio"][method.name] = {
            "federated_s": fed[0],
            "without_flower_s": local["total_s"],
            "ratio": ratio,
        }
        print(
            f"  {method.name}: federated {fed[0]:.0f} s vs the same work without Flower {local['total_s']:.0f} s "
            f"-> {ratio:.2f}x"
        )
    write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
