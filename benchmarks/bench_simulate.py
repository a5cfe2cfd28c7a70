"""The default simulation's wall time and peak memory, and Flower's share of its federated part.

1. Runs ``simulate.py``'s experiment (``default`` unless ``--experiment``) exactly as the README's
   first command does, timing it whole and per method, while a thread samples the resident memory
   of this process and every process it starts (SuperLink, SuperExec, Ray workers, ClientApps).
2. For each federated method of a natural-site scenario, the same local work without Flower
   (``bench_federation.local_equivalent``: every site trains the same steps with the same configs
   and seeds and evaluates the global model every round, averaging in numpy), and the ratio.

    python -m benchmarks.bench_simulate                       # data/synthetic, generated if missing
    python -m benchmarks.bench_simulate --data /tmp/demo --json benchmarks/results/simulate_default.json
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
from simulations.experiment import load_experiment
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    p.add_argument("--experiment", default="default")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
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
        "flower_ratio": {},
    }
    print(
        f"{exp.name}: {wall:.0f} s wall on {os.cpu_count()} CPU(s), peak memory {mem.peak / 2**20:.0f} MB "
        "(this process and everything it started)"
    )
    for t in doc["timings"]:
        print(f"  {t['scenario']:12s} {t['method']:24s} seed {t['seed']}: {t['seconds']:.0f} s")
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
