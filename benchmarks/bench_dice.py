"""Per-study Dice of every method of a simulation report, all sites and seeds pooled, with the
patient-bootstrap 95 % interval (``simulations.report.studies.dice_row``): the report tables it per
site; a paper quotes the pooled figure.

Usage: python -m benchmarks.bench_dice RUN_DIR [--boot 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from simulations.report.studies import dice_row, from_json


def pooled_dice(studies: list[dict], n_boot: int) -> dict[str, dict]:
    """Method -> the ``dice_row`` of all its entries (every site and seed)."""
    return {
        m: dice_row([e for e in studies if e["method"] == m], n_boot)
        for m in dict.fromkeys(e["method"] for e in studies)
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a simulate.py report folder (holds studies.json)")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args(argv)
    studies = from_json(json.loads((args.run / "studies.json").read_text()))
    for method, row in pooled_dice(studies, args.boot).items():
        d = row["dice"]
        if d is None:
            print(f"{method:45s} no study with a reference mask")
        else:
            print(
                f"{method:45s} per-study Dice {d['estimate']:.3f} [{d['low']:.3f}, {d['high']:.3f}] ({row['n']} studies)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
