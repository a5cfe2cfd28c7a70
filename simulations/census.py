"""The data census of a folder of site folders, on Flower's simulation engine: one virtual SuperNode
per site, the same ``query.census`` a deployed site answers, ``rounds.census = only`` (no training).

    python -m simulations.census --data /tmp/census-data --out /tmp/census-report

writes ``OUT/census/census.html`` (and ``census.json``). Each site's ``site.toml`` ``[policy]``
guards its census (``census-min-count``, default 5; ``census-noise``), exactly as at a hospital.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from client.ingest.layouts import list_site_folders
from client.site_tools.run_setup import run_preprocess
from simulations.engine import SimulationEngine, toml_overrides
from simulations.sites import prepare_caches


def census_overrides(data: Path, out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of a census-only run over ``data``'s sites, written to ``out/census``."""
    return {
        "data.root": str(data.resolve()),
        "output.dir": str(out.resolve()),
        "output.name": "census",
        "rounds.census": "only",
        "strategy.min-available-nodes": 1,
        **(extra or {}),
    }


def run_census(
    data: Path,
    out: Path,
    cpus: int | None = None,
    extra: dict[str, Any] | None = None,
    ray_address: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Prepare every site's cache for the run (as ``flwr-client prepare``), then the census on the engine."""
    overrides = census_overrides(data, out, extra)
    sites = list_site_folders(data)
    if not sites:
        raise FileNotFoundError(f"{data}: no site folders")
    prepare_caches(data, run_preprocess(toml_overrides(overrides)), progress=True)
    out.mkdir(parents=True, exist_ok=True)
    with SimulationEngine(out / "engine", total_cpus=cpus, ray_address=ray_address) as engine:
        engine.run(overrides, len(sites), out / "census.log", on_line=print, timeout=timeout)
    return out / "census" / "census.html"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.census", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of site folders (hemexp generate --out)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpus", type=int, help="Ray CPUs (default: all)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="an existing Ray cluster (as simulate.py --ray-address)")
    args = p.parse_args(argv)
    print(f"census: {run_census(args.data, args.out, args.cpus, ray_address=args.ray_address)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
