"""Paper preset training throughput on a GPU at 512x512: fp32 and bf16 autocast, as a share of peak.

One short device run (issue: joint model). For each stage and precision: warm-up steps, then timed
steps of the project's own loss functions (``client.training.train.stage_loss``) on random uint8 slices
(the data path is measured separately on the CPU); FLOPs per image counted once with
``torch.utils.flop_counter``. Prints images/s, achieved TFLOP/s and the share of the dense peak
(H100 SXM: 989 bf16 TFLOP/s, 495 TF32, 67 fp32 non-tensor). Run: ``python -m benchmarks.bench_gpu_train``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from client.training.train import TrainConfig, make_optimizer, stage_loss, trainable_half
from common.losses import pos_weight_from_counts
from common.model import build_joint_model, freeze_unet, unfreeze_unet
from common.presets import get_preset

PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}


def make_batch(b: int, size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    labels = (torch.rand(b, 5, generator=g) < 0.3).float()
    mask = torch.zeros(b, size, size, dtype=torch.uint8)
    mask[:, size // 3 : size // 2, size // 3 : size // 2] = 1
    return {
        "image": torch.randint(0, 256, (b, size, size), dtype=torch.uint8, generator=g),
        "mask": mask,
        "labels": labels,
        "mask_known": torch.ones(b, dtype=torch.bool),
    }


def step_flops(model, batch, stage, device, pos_weight=None) -> float:
    """Training FLOPs per image: forward FLOPs counted, backward taken as 2x the trained part's forward.

    ``torch.utils.flop_counter`` counts forward convolutions right but overcounts the backward of
    grouped (depthwise) convolutions about 16-fold (measured on EfficientNet), so the backward is
    not counted directly.
    """
    from common.model import to_input

    x = to_input(batch["image"], device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as c_unet:
            model.segment(x)
        with FlopCounterMode(display=False) as c_all:
            model(x)
    unet, total = c_unet.get_total_flops(), c_all.get_total_flops()
    flops = 3 * unet if stage == 1 else unet + 3 * (total - unet)
    return flops / batch["image"].shape[0]


def run(stage: int, precision: str, args, device) -> dict:
    cfg = get_preset(args.preset, **({"image_size": args.size} if args.size else {}))
    model = build_joint_model(cfg, seed=0).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    (freeze_unet if stage == 2 else unfreeze_unet)(model)
    model.train()
    opt = make_optimizer([p for p in trainable_half(model, stage).parameters() if p.requires_grad], TrainConfig())
    pos_weight = pos_weight_from_counts([10, 10, 10, 10], [40, 40, 40, 40]).to(device)
    g = torch.Generator().manual_seed(0)
    batch = make_batch(args.batch, cfg.image_size, g)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    flops = step_flops(model, batch, stage, device, pos_weight) if precision != "bf16" else None
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = stage_loss(model, batch, stage, pos_weight, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    per_step = sorted(times)[len(times) // 2]
    return {
        "stage": stage,
        "precision": precision,
        "batch": args.batch,
        "images_per_s": args.batch / per_step,
        "flops_per_image": flops,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} torch {torch.__version__}")
    rows = []
    for stage in (1, 2):
        flops = None
        for precision in ("fp32", "tf32", "bf16"):
            r = run(stage, precision, args, device)
            flops = r["flops_per_image"] or flops
            r["flops_per_image"] = flops
            tflops = flops * r["images_per_s"] / 1e12
            r["achieved_tflops"] = tflops
            r["share_of_peak"] = tflops / PEAK_TFLOPS[precision]
            rows.append(r)
            print(
                f"stage {stage} {precision:5s}: {r['images_per_s']:7.1f} img/s, {flops / 1e9:6.1f} GFLOP/img (fwd+bwd), "
                f"{tflops:6.1f} TFLOP/s = {100 * r['share_of_peak']:5.2f} % of {precision} peak, peak mem {r['peak_gb']:.1f} GB",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
