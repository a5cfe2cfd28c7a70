"""Throughput of the preprocessing (paper §4.1) on the CPU: slices per second for the whole
``preprocess_volume`` and for each step alone.

    python -m benchmarks.bench_preprocess                  # 30 slices of 512 x 512, size 256
    python -m benchmarks.bench_preprocess --slices 60 --size 512 --repeats 9

The volume is a synthetic head built in memory: brain ellipse (35 HU, shrinking towards both
ends) with a 70 HU hematoma, a bone ring (1000 HU) opened on the lowest slice (as at the skull
base), a bone cap without brain on the top slice, scalp (40 HU), a curved head holder (250 HU) under
the head, air (-1000 HU) and Gaussian noise. Times are wall-clock medians over ``--repeats`` runs
after one warm-up run; numpy and scipy.ndimage run these steps on one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from client.preprocessing.brain_mask import brain_mask
from client.preprocessing.pipeline import (
    apply_window,
    centre_brain,
    denoise,
    preprocess_volume,
    resize_slices,
    strip_skull,
    to_uint8,
)
from common.config import AIR_HU, PreprocessConfig


def synthetic_head_volume(
    k: int = 30, n: int = 512, noise: float = 6.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """HU volume ``[k, n, n]`` (float32) and its 0/1 hematoma mask (uint8), head slightly off-centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    cy, cx = 0.47 * n, 0.53 * n
    hu = np.full((k, n, n), AIR_HU, dtype=np.float32)
    mask = np.zeros((k, n, n), dtype=np.uint8)
    for i in range(k):
        s = 0.55 + 0.45 * np.sin(np.pi * (i + 1) / (k + 1))
        ay, ax = 0.36 * n * s, 0.29 * n * s
        r = np.hypot((yy - cy) / ay, (xx - cx) / ax)
        t = 0.025 * n / ay
        sl = np.where(r < 1, 35.0, np.where(r < 1 + t, 1000.0, np.where(r < 1 + 1.8 * t, 40.0, AIR_HU)))
        if i == 0:  # skull base: the ring is open
            sl[(r >= 1) & (r < 1 + t) & (np.abs(xx - cx) < 0.04 * n) & (yy > cy)] = 40.0
        if i == k - 1:  # vertex: a bone cap, no brain
            sl = np.where(r < 1 + t, 1000.0, sl)
        holder = np.abs(np.hypot(yy - cy, xx - cx) - 0.44 * n) < 0.01 * n
        sl[holder & (yy > cy + 0.3 * n)] = 250.0
        blob = np.hypot(yy - (cy - 0.08 * n), xx - (cx + 0.06 * n)) < 0.05 * n * s
        if 0.3 * k <= i <= 0.7 * k:
            sl[blob & (r < 1)] = 70.0
            mask[i] = blob & (r < 1)
        hu[i] = sl
    hu += rng.normal(0.0, noise, hu.shape).astype(np.float32)
    return hu, mask


def _median_seconds(step: Callable[[], object], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=30)
    p.add_argument("--pixels", type=int, default=512, help="side of the input slices")
    p.add_argument("--size", type=int, default=256, help="model input size")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    hu, mask = synthetic_head_volume(args.slices, args.pixels)
    cfg = PreprocessConfig(size=args.size)
    brain = brain_mask(hu)
    img8 = to_uint8(apply_window(hu, cfg.window))
    stripped = strip_skull(img8, brain)
    centred, _, _ = centre_brain(stripped, brain)

    no_denoise = PreprocessConfig(size=args.size, denoise=False)
    window_only = PreprocessConfig(size=args.size, denoise=False, strip_skull=False, centre=False)
    median = f"denoise (median {cfg.denoise_size}x{cfg.denoise_size}, whole slices)"
    steps: list[tuple[str, Callable[[], object]]] = [
        ("preprocess_volume (all steps, with mask)", lambda: preprocess_volume(hu, mask, cfg)),
        ("preprocess_volume (no denoise)", lambda: preprocess_volume(hu, mask, no_denoise)),
        ("preprocess_volume (window + resize only)", lambda: preprocess_volume(hu, mask, window_only)),
        ("apply_window + to_uint8", lambda: to_uint8(apply_window(hu, cfg.window))),
        (median, lambda: denoise(img8, cfg.denoise_size)),
        ("brain_mask", lambda: brain_mask(hu)),
        ("strip_skull", lambda: strip_skull(img8, brain)),
        ("centre_brain (image + mask)", lambda: centre_brain(stripped, brain, mask)),
        (f"resize_slices image -> {args.size} (bilinear)", lambda: resize_slices(centred, args.size, order=1)),
        (f"resize_slices mask -> {args.size} (nearest)", lambda: resize_slices(mask, args.size, order=0)),
    ]
    k = args.slices
    print(
        f"{k} slices of {args.pixels} x {args.pixels}, model size {args.size}, "
        f"median of {args.repeats} runs, {os.cpu_count()} CPUs, numpy {np.__version__}"
    )
    print(f"{'step':<48} {'ms/volume':>10} {'ms/slice':>9} {'slices/s':>9}")
    for name, step in steps:
        sec = _median_seconds(step, args.repeats)
        print(f"{name:<48} {sec * 1e3:>10.1f} {sec * 1e3 / k:>9.2f} {k / sec:>9.0f}", flush=True)
    frac = brain.mean(axis=(1, 2))
    print(
        f"\nbrain fraction per slice: min {frac.min():.3f}, median {np.median(frac):.3f}, max {frac.max():.3f}; "
        f"bone inside brain: {int((hu[brain] >= 150).sum())} pixels"
    )


if __name__ == "__main__":
    main()
