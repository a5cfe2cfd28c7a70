"""Cost of the conditional SNGAN per preset: parameters and wall time of one GAN step.

A step is what ``client.training.gan.train_gan`` counts: ``n_dis`` discriminator updates and one
generator update, each on ``batch_size`` crops. Crops are random (the cost does not depend on
their content); the time is the median of ``--steps`` timed steps after one warm-up step.

    python -m benchmarks.bench_gan                             # tiny and small on the CPU
    python -m benchmarks.bench_gan --presets paper --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from client.training.gan import make_gan_optimizers, train_gan
from common.gan import GAN_PRESETS, build_gan, get_gan_preset


def bench_gan_preset(name: str, steps: int, device: str) -> dict[str, float | int | str]:
    """Parameters (millions) and median seconds per GAN step of preset ``name`` on ``device``."""
    cfg = get_gan_preset(name)
    G, D = build_gan(cfg, seed=0)
    G, D = G.to(device), D.to(device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4 * cfg.batch_size, 1, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    labels = torch.randint(0, cfg.n_classes, (images.shape[0],), generator=g)
    optimizers = make_gan_optimizers(G, D, cfg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        train_gan(G, D, images, labels, cfg, steps=1, seed=i, optimizers=optimizers)
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "preset": name,
        "image_size": cfg.image_size,
        "batch": cfg.batch_size,
        "n_dis": cfg.n_dis,
        "g_params_m": round(sum(p.numel() for p in G.parameters()) / 1e6, 3),
        "d_params_m": round(sum(p.numel() for p in D.parameters()) / 1e6, 3),
        "s_per_step": round(statistics.median(times[1:]), 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(GAN_PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.presets:
        print(bench_gan_preset(name, args.steps, args.device), flush=True)


if __name__ == "__main__":
    main()
