"""Cost of the conditional SNGAN per preset: parameters and wall time of one GAN step; with
``--federated``, what a federated GAN stage (``rounds.gan``, docs/gan.md design (i)) costs per round.

A step is what ``client.training.gan.train_gan`` counts: ``n_dis`` discriminator updates and one
generator update, each on ``batch_size`` crops. Crops are random (the cost does not depend on
their content); the time is the median of ``--steps`` timed steps after one warm-up step.

``--federated``: ``--sites`` phantom sites (6 studies each, 32-px tiny model, tiny GAN), the real
ServerApp and ClientApp handlers in one process (the tests' FakeGrid: sites run one after the other,
so a round's seconds are the sum of every site's work, not a deployment's wall time). Two runs:
design (i), 1 stage-1 + ``--gan-rounds`` GAN rounds of ``--gan-local-steps`` + 1 stage-2 round; design
(ii), 1 + 1 rounds with each site training its own GAN for ``gan-rounds x gan-local-steps`` steps in
its first stage-2 round. Per round: the seconds and the payload bytes sent to and received from each
site (``history.json``'s ``bytes``, ``server.validation.content_bytes``), mean over sites.

    python -m benchmarks.bench_gan                             # tiny and small on the CPU
    python -m benchmarks.bench_gan --presets paper --device cuda
    python -m benchmarks.bench_gan --federated --sites 12 --out benchmarks/results/gan_stage_cost.txt
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from client.training.gan import make_gan_optimizers, train_gan
from common.gan import GAN_PRESETS, build_gan, get_gan_preset
from common.runtime import use_torch_threads


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


def federated_rounds(root: Path, out: Path, n_sites: int, **overrides) -> list[dict]:
    """One FakeGrid run over ``root``'s sites; per round: stage, seconds, mean bytes per site each way."""
    from client.client_app import app
    from server.federation import run_federation
    from tests.helpers.flower import set_task_identity, site_grid, tiny_run_config

    set_task_identity()
    rc = tiny_run_config(root, out, **{"rounds.stage2": 1, "gan.augment-ratio": 0.5, **overrides})
    run_federation(site_grid(app, rc, n_sites), rc)
    rounds = json.loads((out / "run" / "history.json").read_text())["rounds"]
    return [
        {
            "round": r["round"],
            "stage": r["stage"],
            "seconds": round(r["seconds"], 1),
            "sent_kb": round(statistics.mean(b["sent"] for b in r["bytes"].values()) / 1e3, 1),
            "received_kb": round(statistics.mean(b["received"] for b in r["bytes"].values()) / 1e3, 1),
            "sites": len(r["bytes"]),
            "failures": len(r["failures"]),
        }
        for r in rounds
    ]


def bench_federated(n_sites: int, gan_rounds: int, local_steps: int) -> dict[str, list[dict]]:
    """Design (i) and design (ii) on the same phantom sites, at the same generator updates per site."""
    from common.run_config import model_from_run_config
    from simulations.sites import prepare_caches
    from tests.helpers.data import write_site
    from tests.helpers.flower import tiny_run_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        for i in range(n_sites):
            write_site(root / f"site-{i + 1:02d}", n_studies=6, shape=(4, 40, 40), seed=10 * i)
        prepare_caches(root, model_from_run_config(tiny_run_config(root, Path(tmp)))[1], progress=False)
        federated = {"rounds.gan": gan_rounds, "gan.local-steps": local_steps}
        return {
            "i": federated_rounds(root, Path(tmp) / "i", n_sites, **federated),
            "ii": federated_rounds(root, Path(tmp) / "ii", n_sites, **{"gan.steps": gan_rounds * local_steps}),
        }


def format_federated(results: dict[str, list[dict]], command: str) -> str:
    lines = [f"# {command}", "design round stage seconds sent_kb/site received_kb/site sites failures"]
    for design, rows in results.items():
        lines += [
            f"{design:>6} {r['round']:>5} {r['stage']!s:>5} {r['seconds']:>7} {r['sent_kb']:>12} "
            f"{r['received_kb']:>16} {r['sites']:>5} {r['failures']:>8}"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(GAN_PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--federated", action="store_true", help="cost per round of the federated GAN stage")
    parser.add_argument("--sites", type=int, default=12)
    parser.add_argument("--gan-rounds", type=int, default=2)
    parser.add_argument("--gan-local-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, help="--federated: also write the table here")
    args = parser.parse_args(argv)
    use_torch_threads(args.threads)
    if args.federated:
        table = format_federated(
            bench_federated(args.sites, args.gan_rounds, args.gan_local_steps),
            "python -m benchmarks.bench_gan " + shlex.join(sys.argv[1:] if argv is None else argv),
        )
        print(table, end="", flush=True)
        if args.out:
            args.out.write_text(table)
        return
    for name in args.presets:
        print(bench_gan_preset(name, args.steps, args.device), flush=True)


if __name__ == "__main__":
    main()
