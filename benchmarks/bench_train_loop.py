"""Training throughput of the project's loop vs a bare PyTorch step (issue: joint model).

Same model, same batch size, same stage: ``client.training.train.train_stage`` reading a real site cache
through the DataLoader (augmentation on) against a bare loop over tensors already in memory.
Ratio >= 0.9 means data loading and bookkeeping never stall the model.
Run: ``python -m benchmarks.bench_train_loop [--preset small] [--steps 20]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from client.data.cache import build_site_cache
from client.data.dataset import SliceDataset, brain_slices, make_loader
from client.training.train import TrainConfig, make_optimizer, stage_loss, train_stage, trainable_half
from common.config import PreprocessConfig
from common.losses import pos_weight_from_counts
from common.model import build_joint_model, freeze_unet, unfreeze_unet
from common.presets import get_preset
from tests.helpers.data import write_site


def bare_steps(model, batches, stage, cfg, pos_weight) -> float:
    (freeze_unet if stage == 2 else unfreeze_unet)(model)
    model.train()
    opt = make_optimizer([p for p in trainable_half(model, stage).parameters() if p.requires_grad], cfg)
    t0, n = 0.0, 0
    for i, batch in enumerate(batches):
        if i == 2:  # the first two steps are warm-up, as for the loop
            t0, n = time.perf_counter(), 0
        loss = stage_loss(model, batch, stage, pos_weight, torch.device("cpu"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    mcfg = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        site = write_site(Path(tmp) / "site-01", n_studies=8, shape=(12, mcfg.image_size, mcfg.image_size))
        cache, _ = build_site_cache(site, Path(tmp) / "cache", PreprocessConfig(size=mcfg.image_size))
        ds = SliceDataset(cache, brain_slices(cache))
        pos_weight = pos_weight_from_counts([10] * 4, [30] * 4)
        print(
            f"preset {args.preset} ({mcfg.image_size}px), batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} threads"
        )
        for stage in (1, 2):
            cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, epochs=100, augment=True, balanced=False)
            model = build_joint_model(mcfg, seed=0)
            loader = make_loader(ds, args.batch, shuffle=True, seed=0)
            train_stage(
                model, loader, stage, TrainConfig(batch_size=args.batch, max_steps=2, epochs=1), "cpu", pos_weight
            )  # warm-up
            result = train_stage(model, loader, stage, cfg, "cpu", pos_weight if stage == 2 else None)
            loop = result.images_per_second
            batches = [next(iter(make_loader(ds, args.batch, shuffle=True, seed=i))) for i in range(args.steps + 2)]
            bare = bare_steps(build_joint_model(mcfg, seed=0), batches, stage, cfg, pos_weight)
            print(
                f"stage {stage}: project loop {loop:7.1f} img/s, bare step {bare:7.1f} img/s, ratio {loop / bare:.3f} (target >= 0.9)"
            )


if __name__ == "__main__":
    main()
