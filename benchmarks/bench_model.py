"""Size and CPU cost of each model preset: parameters, and time per image of a stage-1 step
(U-Net only), a stage-2 step (classifier, U-Net frozen) and inference (full forward).

    python -m benchmarks.bench_model                     # tiny, small, paper@256
    python -m benchmarks.bench_model --presets small --batch 16 --steps 5
    python -m benchmarks.bench_model --presets paper --image-size 512 --batch 16 \
        --device cuda --amp bf16 --channels-last

Times are wall-clock medians over ``--steps`` timed steps after one warm-up step, with
``torch.set_num_threads(--threads)``. Device: CPU unless ``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.losses import segmentation_loss, weighted_bce
from common.model import build_joint_model, count_parameters, freeze_unet
from common.presets import PRESETS, get_preset
from common.runtime import use_torch_threads

#: Defaults per preset: (image size, batch, timed steps); paper at 256 costs seconds per step.
DEFAULT_RUNS: dict[str, tuple[int, int, int]] = {"tiny": (64, 8, 5), "small": (128, 16, 3), "paper": (256, 2, 2)}


@dataclass(frozen=True)
class BenchRow:
    preset: str
    image_size: int
    batch: int
    params_m: float
    unet_m: float
    classifier_m: float
    stage1_ms: float
    stage2_ms: float
    infer_ms: float


def _median_seconds(step: Callable[[], None], steps: int, sync: Callable[[], None]) -> float:
    step()  # warm-up: allocator, kernels selection
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_preset(
    name: str,
    image_size: int,
    batch: int,
    steps: int,
    device: torch.device,
    amp: str = "none",
    channels_last: bool = False,
) -> BenchRow:
    """Time the three kinds of step for one preset at one image size."""
    cfg = get_preset(name, image_size=image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_joint_model(cfg, seed=0).to(device, memory_format=fmt)
    x = torch.rand(batch, 1, image_size, image_size, device=device).to(memory_format=fmt)
    mask = (torch.rand(batch, 1, image_size, image_size, device=device) > 0.9).float()
    pixel_mm = torch.full((batch,), 0.44 * 512 / image_size, device=device)  # a 225 mm field of view
    labels = (torch.rand(batch, cfg.n_outputs, device=device) > 0.7).float()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast() -> contextlib.AbstractContextManager:
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    opt1 = torch.optim.AdamW(model.unet.parameters(), lr=1e-4)

    def stage1() -> None:
        opt1.zero_grad(set_to_none=True)
        with autocast():
            loss = segmentation_loss(model.segment(x), mask)
        assert torch.isfinite(loss), "non-finite stage-1 loss"
        loss.backward()
        opt1.step()

    model.train()
    t1 = _median_seconds(stage1, steps, sync)

    freeze_unet(model)
    opt2 = torch.optim.AdamW(model.classifier.parameters(), lr=1e-4)

    def stage2() -> None:
        opt2.zero_grad(set_to_none=True)
        with autocast():
            _, logits = model(x, mask, pixel_mm)
            loss = weighted_bce(logits, labels)
        assert torch.isfinite(loss), "non-finite stage-2 loss"
        loss.backward()
        opt2.step()

    model.train()
    t2 = _median_seconds(stage2, steps, sync)

    def infer() -> None:
        with torch.inference_mode(), autocast():
            model(x, pixel_mm=pixel_mm)

    model.eval()
    t3 = _median_seconds(infer, steps, sync)
    per_image_ms = 1000.0 / batch
    return BenchRow(
        preset=name,
        image_size=image_size,
        batch=batch,
        params_m=count_parameters(model) / 1e6,
        unet_m=count_parameters(model, ["unet"]) / 1e6,
        classifier_m=count_parameters(model, ["classifier"]) / 1e6,
        stage1_ms=t1 * per_image_ms,
        stage2_ms=t2 * per_image_ms,
        infer_ms=t3 * per_image_ms,
    )


def format_table(rows: list[BenchRow]) -> str:
    head = (
        f"{'preset':<7} {'size':>5} {'batch':>5} {'params M':>9} {'unet M':>7} {'clf M':>7} "
        f"{'stage1 ms/img':>14} {'stage2 ms/img':>14} {'infer ms/img':>13}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.preset:<7} {r.image_size:>5} {r.batch:>5} {r.params_m:>9.2f} {r.unet_m:>7.2f} "
            f"{r.classifier_m:>7.2f} {r.stage1_ms:>14.1f} {r.stage2_ms:>14.1f} {r.infer_ms:>13.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_RUNS), choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=None, help="override every preset's run size")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    use_torch_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name in args.presets:
        size, batch, steps = DEFAULT_RUNS.get(name, (get_preset(name).image_size, 4, 3))
        rows.append(
            bench_preset(
                name,
                args.image_size or size,
                args.batch or batch,
                args.steps or steps,
                device,
                amp=args.amp,
                channels_last=args.channels_last,
            )
        )
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"\n{where}, amp={args.amp}, channels_last={args.channels_last}, torch {torch.__version__}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
