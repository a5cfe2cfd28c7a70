"""Ingest + preprocessing throughput for 512x512 slices (issue: site data pipeline).

Writes a site of N studies x 30 slices of 512x512 CT (real DICOM files) to a temp folder, then
times: reading alone (pydicom -> HU volume), the first cache build (read + preprocess + write),
and the second build (cache hit). Prints slices/s. Run: ``python -m benchmarks.bench_ingest``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from client.data.cache import build_site_cache
from client.ingest.dicom import read_study
from common.config import PreprocessConfig
from tests.helpers.data import head_phantom, write_series


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--slices", type=int, default=30)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--size", type=int, default=256, help="model input size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site-01"
        for i in range(args.studies):
            hu = head_phantom((args.slices, args.matrix, args.matrix), seed=i)
            hu += np.random.default_rng(i).normal(0, 4, hu.shape).round().astype(np.float32) * (hu > -1000)
            write_series(site / "dicom" / f"P{i:03d}" / f"S{i:03d}", hu, spacing=(5.0, 0.45, 0.45), seed=i)
        n = args.studies * args.slices
        t0 = time.perf_counter()
        for i in range(args.studies):
            read_study(site / "dicom" / f"P{i:03d}" / f"S{i:03d}")
        t_read = time.perf_counter() - t0
        cfg = PreprocessConfig(size=args.size)
        t0 = time.perf_counter()
        cache, _ = build_site_cache(site, Path(tmp) / "cache", cfg)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again, _ = build_site_cache(site, Path(tmp) / "cache", cfg)
        t_second = time.perf_counter() - t0
        assert again.hit and again.n_slices == n
    print(f"{n} slices of {args.matrix}x{args.matrix} -> {args.size}x{args.size}")
    print(f"read DICOM only:              {n / t_read:8.1f} slices/s ({t_read:.2f} s)")
    print(f"read + preprocess + cache:    {n / t_first:8.1f} slices/s ({t_first:.2f} s)   target >= 200")
    print(f"second pass (cache hit):      {n / t_second:8.1f} slices/s ({t_second * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
