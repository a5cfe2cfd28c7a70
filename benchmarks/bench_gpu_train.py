"""Training throughput of the project's own loop (``client.training.train.train_stage``) against a plain loop.

For each stage: the plain reference loop (fp32, NCHW, augmentation on the CPU, float batches copied to
the device, no loader workers: what ``train_stage`` did before it chose speed options per device), then
``train_stage`` in fp32 (channels_last, augmentation on the device, loader workers) and in bf16 autocast
(``Acceleration.for_device`` on a GPU), optionally with ``torch.compile``. Same model, batches, optimiser
and augmentation draws. Prints images/s, the speed-up over the plain loop, achieved TFLOP/s and the share
of the dense peak (H100/H200 SXM: 989 bf16 TFLOP/s, 495 TF32, 67 fp32 non-tensor).

GPU: ``python -m benchmarks.bench_gpu_train`` (paper preset, 512 px, batch 32).
CPU check that the script runs: ``python -m benchmarks.bench_gpu_train --device cpu --preset tiny --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from client.training.train import (
    Acceleration,
    TrainConfig,
    augment_batch,
    make_optimizer,
    output_columns,
    stage2_logits,
    train_stage,
    trainable_half,
)
from common.losses import pos_weight_from_counts, segmentation_loss, weighted_bce
from common.model import JointModel, build_joint_model, freeze_unet, to_input, unfreeze_unet
from common.presets import get_preset

PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}


#: A head CT's pixel at 512 x 512 (a 225 mm field of view): the random slices' nominal pixel size.
NOMINAL_PIXEL_MM = 0.44


class RandomSlices(Dataset):
    """Random uint8 slices with a square hematoma and random marker labels (the cache's sample layout)."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.image = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=g)
        self.mask = torch.zeros(n, size, size, dtype=torch.uint8)
        self.mask[:, size // 3 : size // 2, size // 3 : size // 2] = 1
        self.labels = (torch.rand(n, 5, generator=g) < 0.3).float()

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.image[i],
            "mask": self.mask[i],
            "labels": self.labels[i],
            "mask_known": torch.tensor(True),
            "pixel_mm": torch.tensor(NOMINAL_PIXEL_MM * 512 / self.image.shape[-1]),
        }


def loader(ds: Dataset, batch: int, seed: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))


def plain_loop(
    model: JointModel,
    batches: DataLoader,
    stage: int,
    cfg: TrainConfig,
    device: torch.device,
    pos_weight: torch.Tensor | None = None,
    on_step=None,
) -> list[float]:
    """The reference loop: fp32, NCHW, CPU augmentation, constant learning rate; returns the losses.

    Written apart from ``train_stage`` on purpose: with ``Acceleration()`` (the CPU default) the two
    must give bit-identical weights (tests/client/training/test_train.py checks it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        (freeze_unet if stage == 2 else unfreeze_unet)(model)
        model.to(device).train()
        opt = make_optimizer([p for p in trainable_half(model, stage).parameters() if p.requires_grad], cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        losses: list[float] = []
        for batch in (b for _ in range(cfg.max_steps) for b in batches):
            if len(losses) == cfg.max_steps:
                break
            image, mask = to_input(batch["image"]), batch["mask"].unsqueeze(1).float()
            if stage == 1:
                if cfg.augment:
                    image, mask = augment_batch(image, mask, cfg, g)
                loss = segmentation_loss(model.segment(image.to(device)), mask.to(device))
            else:  # the classifier's input is cut around the mask and augmented there (stage2_logits)
                augment = cfg if cfg.augment else None
                logits = stage2_logits(model, batch, image.to(device), mask.to(device), device, augment, g)
                loss = weighted_bce(logits, batch["labels"][:, output_columns(model)].to(device), pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(len(losses), losses[-1])
        model.eval()
        return losses


def step_flops(model: JointModel, image: torch.Tensor, stage: int) -> float:
    """Training FLOPs per image: forward FLOPs counted, backward taken as 2x the trained part's forward.

    ``torch.utils.flop_counter`` counts forward convolutions right but overcounts the backward of
    grouped (depthwise) convolutions about 16-fold (measured on EfficientNet), so the backward is
    not counted directly.
    """
    x = to_input(image).to(next(model.parameters()).device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as c_unet:
            model.segment(x)
        with FlopCounterMode(display=False) as c_all:
            model(x, pixel_mm=torch.full((x.shape[0],), NOMINAL_PIXEL_MM * 512 / x.shape[-1], device=x.device))
    unet, total = c_unet.get_total_flops(), c_all.get_total_flops()
    return (3 * unet if stage == 1 else unet + 3 * (total - unet)) / x.shape[0]


class StepClock:
    """``on_step`` callback: the time of each step (the loop reads the loss, so the device has synced)."""

    def __init__(self) -> None:
        self.stamps = [time.perf_counter()]
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        self.stamps.append(time.perf_counter())
        self.losses.append(loss)

    def median_step(self, warmup: int) -> float:
        steps = sorted(b - a for a, b in zip(self.stamps[warmup:], self.stamps[warmup + 1 :]))
        return steps[len(steps) // 2]


def variants(device: torch.device, compile: bool) -> dict[str, Acceleration | None]:
    """The loops measured: None is the plain loop; the bf16 row is what a GPU gets by default."""
    auto = Acceleration.for_device(device)
    workers = auto.workers
    rows: dict[str, Acceleration | None] = {
        "plain fp32": None,
        "train_stage fp32": Acceleration(channels_last=True, workers=workers),
        "train_stage bf16": Acceleration(bf16=True, channels_last=True, workers=workers),
    }
    if compile:
        rows["train_stage bf16+compile"] = Acceleration(bf16=True, channels_last=True, compile=True, workers=workers)
    return rows


def run(stage: int, name: str, accel: Acceleration | None, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = get_preset(args.preset, **({"image_size": args.size} if args.size else {}))
    model = build_joint_model(cfg, seed=0)
    ds = RandomSlices(args.batch * 4, cfg.image_size)
    pos_weight = pos_weight_from_counts([10] * cfg.n_outputs, [40] * cfg.n_outputs).to(device)
    steps = args.warmup + args.steps
    train = TrainConfig(schedule="constant", epochs=steps, max_steps=steps, batch_size=args.batch)
    clock = StepClock()
    data = loader(ds, args.batch, 0)
    if accel is None:
        plain_loop(model, data, stage, train, device, pos_weight, clock)
    else:
        train_stage(model, data, stage, train, device, pos_weight, on_step=clock, accel=accel)
    per_step = clock.median_step(args.warmup)
    return {
        "stage": stage,
        "loop": name,
        "batch": args.batch,
        "images_per_s": args.batch / per_step,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan"),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes of compiling)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.device == "cpu" and args.batch == 32:
        args.batch = 4
    print(
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} torch {torch.__version__}, "
        f"{args.preset} preset, batch {args.batch}"
    )
    rows = []
    for stage in (1, 2):
        cfg = get_preset(args.preset, **({"image_size": args.size} if args.size else {}))
        flops = step_flops(build_joint_model(cfg, seed=0).to(device), RandomSlices(2, cfg.image_size).image, stage)
        base = None
        for name, accel in variants(device, args.compile).items():
            r = run(stage, name, accel, args, device)
            base = base or r["images_per_s"]
            precision = "bf16" if accel is not None and accel.bf16 else "fp32"
            tflops = flops * r["images_per_s"] / 1e12
            r |= {
                "flops_per_image": flops,
                "speedup": r["images_per_s"] / base,
                "achieved_tflops": tflops,
                "share_of_peak": tflops / PEAK_TFLOPS[precision],
            }
            rows.append(r)
            print(
                f"stage {stage} {name:26s}: {r['images_per_s']:8.1f} img/s  x{r['speedup']:4.2f} vs plain, "
                f"{flops / 1e9:6.1f} GFLOP/img, {tflops:6.2f} TFLOP/s = {100 * r['share_of_peak']:5.2f} % of "
                f"{precision} peak, peak mem {r['peak_gb']:.1f} GB",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
