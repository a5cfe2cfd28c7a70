"""What DP-SGD at the site costs (docs/privacy.md): time and memory per step, and accuracy.

(a) default: seconds per step, images/s and peak memory of a plain step (BatchNorm, the default
    model; GroupNorm, the DP model without DP) and of a private step (GroupNorm + Opacus per-slice
    clipping and noise), tiny and small presets, stage 1 and stage 2, on CPU. Each measurement runs
    in its own process so that its peak resident memory is its own.
(b) ``--accuracy``: centralised two-stage training on the synthetic data with the same step budget
    at each epsilon and without DP; test Dice and slice-level macro AUC (the mean over markers of
    the per-slice ROC AUC) on the pooled test patients.

Run: ``python -m benchmarks.bench_privacy`` and
``python -m benchmarks.bench_privacy --accuracy --data /tmp/dpdata4 --steps 100 --epsilons 1 8``
(``--data`` is generated there when missing: 4 sites, 64 px, twice the default patients; seed 7).
Both print their tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

MODES = ("plain-batchnorm", "plain-groupnorm", "dp")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(cache_path: str, preset: str, stage: int, mode: str, batch: int, steps: int) -> dict:
    """One (preset, stage, mode): warm-up 2 steps, then ``steps`` timed steps of ``train_stage``."""
    from client.data.cache import open_cache
    from client.data.dataset import SliceDataset, brain_slices, make_loader
    from client.training.privacy import DPSGD
    from client.training.train import TrainConfig, train_stage
    from common.losses import pos_weight_from_counts
    from common.model import build_joint_model
    from common.presets import get_preset

    cache = open_cache(cache_path)
    ds = SliceDataset(cache, brain_slices(cache))
    model = build_joint_model(get_preset(preset, norm="batch" if mode == "plain-batchnorm" else "group"), seed=0)
    pos_weight = pos_weight_from_counts([10] * 4, [30] * 4) if stage == 2 else None
    cfg = TrainConfig(batch_size=batch, epochs=1000, max_steps=2, augment=True, balanced=False, schedule="constant")

    def run(n: int):
        privacy = DPSGD(1.0, 1.0, seed=0) if mode == "dp" else None
        loader = make_loader(ds, batch, shuffle=True, seed=0)
        return train_stage(model, loader, stage, replace(cfg, max_steps=n), "cpu", pos_weight, privacy=privacy)

    run(2)  # warm-up
    rss0 = _rss_mb()
    result = run(steps)
    return {
        "preset": preset,
        "stage": stage,
        "mode": mode,
        "seconds_per_step": result.seconds / result.steps,
        "images_per_second": result.images_per_second,
        "images": result.num_examples,
        "steps": result.steps,
        "peak_rss_mb": _rss_mb(),
        "rss_growth_mb": _rss_mb() - rss0,
    }


def cost_table(batch: int, steps: dict[str, int]) -> None:
    from client.data.cache import build_site_cache
    from common.config import PreprocessConfig
    from common.presets import get_preset
    from tests.helpers.data import write_site

    print(
        f"DP-SGD cost per step on CPU ({os.environ.get('OMP_NUM_THREADS', 'all')} thread(s), torch "
        f"{torch.__version__}), batch {batch} (DP: Poisson batches of expected size {batch}), "
        f"augmentation on, noise multiplier 1, clipping 1"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in steps:
            size = get_preset(preset).image_size
            site = write_site(Path(tmp) / preset / "site-01", n_studies=8, shape=(12, size, size))
            cache, _ = build_site_cache(site, Path(tmp) / preset / "cache", PreprocessConfig(size=size))
            for stage in (1, 2):
                for mode in MODES:
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--one",
                            str(cache.path),
                            preset,
                            str(stage),
                            mode,
                            str(batch),
                            str(steps[preset]),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    r = rows[-1]
                    print(
                        f"  {preset:5s} stage {stage} {mode:16s} {r['seconds_per_step']:7.3f} s/step "
                        f"{r['images_per_second']:7.1f} img/s  peak RSS {r['peak_rss_mb']:6.0f} MB "
                        f"(+{r['rss_growth_mb']:.0f} MB while timing)",
                        flush=True,
                    )
    print("\nprivate step / plain step (seconds per image):")
    for preset in steps:
        for stage in (1, 2):
            by = {r["mode"]: r for r in rows if r["preset"] == preset and r["stage"] == stage}
            per_img = {m: 1 / by[m]["images_per_second"] for m in MODES}
            print(
                f"  {preset:5s} stage {stage}: dp / plain-groupnorm {per_img['dp'] / per_img['plain-groupnorm']:.2f}x, "
                f"dp / plain-batchnorm {per_img['dp'] / per_img['plain-batchnorm']:.2f}x, "
                f"groupnorm / batchnorm {per_img['plain-groupnorm'] / per_img['plain-batchnorm']:.2f}x"
            )


# --- (b) accuracy ---------------------------------------------------------------------------------


def slice_macro_auc(metrics: dict, names) -> float:
    vals = [metrics.get(f"auc_slice/{n}", float("nan")) for n in names if n != "expansion"]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def accuracy_table(data: Path, preset: str, steps: int, batch: int, epsilons: list[float], lr: float) -> None:
    from torch.utils.data import ConcatDataset, Subset

    from client.data.dataset import SliceDataset, make_loader, split_slices
    from client.training.evaluate import evaluate
    from client.training.privacy import DPSGD, noise_for_budget, sample_rate, usable_slices
    from client.training.train import TrainConfig, train_stage
    from common.config import LABELS, PreprocessConfig
    from common.losses import label_counts, pos_weight_from_counts
    from common.model import build_joint_model
    from common.presets import get_preset
    from simulations.sites import prepare_caches

    if not data.is_dir():
        from simulations.synthetic import generate_dataset

        generate_dataset(data, n_sites=4, seed=7, matrix=64, studies_scale=2.0, progress=False)
    mcfg = get_preset(preset, norm="group")
    caches, _ = prepare_caches(data, PreprocessConfig(size=mcfg.image_size), progress=False)
    splits = {name: split_slices(c, (0.6, 0.2, 0.2), seed=0) for name, c in caches.items()}
    train = {
        s: ConcatDataset(
            [
                Subset(
                    SliceDataset(c, splits[n]["train"]),
                    np.flatnonzero(usable_slices(SliceDataset(c, splits[n]["train"]), s, mcfg)).tolist(),
                )
                for n, c in caches.items()
            ]
        )
        for s in (1, 2)
    }
    test = ConcatDataset([SliceDataset(c, splits[n]["test"]) for n, c in caches.items()])
    n_train = sum(len(splits[n]["train"]) for n in caches)
    delta = 1 / n_train
    labels = np.concatenate([SliceDataset(c, splits[n]["train"]).labels() for n, c in caches.items()])
    model0 = build_joint_model(mcfg, seed=0)
    cols = [LABELS.index(n) for n in model0.output_names]
    pos_weight = pos_weight_from_counts(*label_counts(labels[:, cols]))
    q = {s: sample_rate(len(train[s]), batch) for s in (1, 2)}
    print(
        f"accuracy at equal step budget: {preset} preset ({mcfg.image_size} px, GroupNorm), {data} "
        f"({len(caches)} sites pooled: {n_train} training slices, {len(train[1])} with a mask, {len(train[2])} labelled; "
        f"{len(test)} test slices), {steps} steps per stage, batch {batch}, AdamW lr {lr}, clipping 1, delta 1/{n_train}"
    )
    for eps in [None, *epsilons]:
        t0 = time.perf_counter()
        model = build_joint_model(mcfg, seed=0)
        sigma = noise_for_budget(eps, delta, [(q[1], steps), (q[2], steps)]) if eps else 0.0
        for stage in (1, 2):
            cfg = TrainConfig(
                batch_size=batch,
                epochs=1000,
                max_steps=steps,
                lr=lr,
                schedule="constant",
                augment=True,
                balanced=False,
                seed=stage,
            )
            privacy = DPSGD(sigma, 1.0, seed=stage) if eps else None
            loader = make_loader(train[stage], batch, shuffle=True, seed=stage)
            train_stage(model, loader, stage, cfg, "cpu", pos_weight if stage == 2 else None, privacy=privacy)
        m = evaluate(model, test, "cpu", 32)
        label = f"epsilon {eps:g}" if eps else "no DP"
        print(
            f"  {label:12s} noise multiplier {sigma:6.3f}: test Dice {m['dice']:.3f}, slice macro AUC "
            f"{slice_macro_auc(m, model.output_names):.3f}, study macro AUC {m['macro_auc_study']:.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        path, preset, stage, mode, batch, steps = sys.argv[2:8]
        print(json.dumps(measure_one(path, preset, int(stage), mode, int(batch), int(steps))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps-tiny", type=int, default=10)
    ap.add_argument("--steps-small", type=int, default=6)
    ap.add_argument("--data", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=100, help="--accuracy: steps per stage")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    if args.accuracy:
        accuracy_table(args.data, args.preset, args.steps, args.batch, args.epsilons, args.lr)
    else:
        cost_table(args.batch, {"tiny": args.steps_tiny, "small": args.steps_small})


if __name__ == "__main__":
    main()
