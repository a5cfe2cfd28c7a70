"""Time the default synthetic dataset (12 sites, matrix 96, scale 6.5) written into a temporary folder.

Usage: python -m benchmarks.bench_generate [--sites 12] [--matrix 96] [--scale 6.5] [--seed 0] [--workers N]
Prints wall time, studies, files and files per second, then the per-site breakdown (a site's time
is its worker's wall time; sites run in parallel, one worker per CPU core by default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from simulations.synthetic import generate_dataset
from simulations.synthetic.generate import DEFAULT_MATRIX
from simulations.synthetic.profiles import DEFAULT_STUDIES_SCALE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=12)
    ap.add_argument("--matrix", type=int, default=DEFAULT_MATRIX)
    ap.add_argument("--scale", type=float, default=DEFAULT_STUDIES_SCALE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hemexp-bench-") as tmp:
        t0 = time.perf_counter()
        s = generate_dataset(
            Path(tmp) / "data",
            n_sites=args.sites,
            seed=args.seed,
            matrix=args.matrix,
            studies_scale=args.scale,
            progress=False,
            workers=args.workers,
        )
        dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "data").rglob("*") if f.is_file())
    print(
        f"generate_dataset(sites={args.sites}, matrix={args.matrix}, scale={args.scale}): "
        f"{dt:.1f} s, {s.studies} studies, {s.files} files, {s.files / dt:.0f} files/s, "
        f"{size / 1e6:.0f} MB"
    )
    for site in s.sites:
        print(
            f"  {site.site_id}: {site.studies:3d} studies ({site.followups} follow-ups), "
            f"{site.files:5d} files, {site.elapsed_s:5.1f} s"
        )


if __name__ == "__main__":
    main()
