"""Federation benchmark: Flower's overhead over plain local training, and bytes on the wire.

1. Overhead = wall time of an N-round ``flwr run`` simulation (12 sites by default, the app's
   default run config unless overridden) / wall time of the same work done in one process without
   Flower: every site trains the same local steps (same configs, same seeds) and evaluates the
   global model every round, and the halves are averaged in numpy. Site caches are built first,
   outside both timings. The simulation runs against a SuperLink this script starts on a free
   loopback port (its own FLWR_HOME) and stops at the end; its start-up is timed separately.
   Both sides get the same compute: ``--threads`` torch threads, and Ray is given that many CPUs
   with one virtual node running at a time (1 by default: on a shared machine a second thread
   waiting on a busy core makes small convolutions many times slower, for both sides alike).
   ``--parallel``: Flower gets every CPU, one per virtual node (several sites train at a time, as
   ``simulate.py`` runs it); the run without Flower gets one process with as many torch threads.
2. Bytes sent per site per round in each stage (train down, train up, evaluate down), against the
   full fp32 model, for each preset; from the same functions the ServerApp and ClientApp use.

    python -m benchmarks.bench_federation --data data/synthetic
    python -m benchmarks.bench_federation --data data/synthetic -c "rounds.stage1=1 rounds.stage2=1" --skip-bytes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from client.federation.node import SiteNode, partition_site
from client.federation.site_data import open_site, site_label_counts, usable_examples
from client.federation.site_run import SiteRunConfig
from client.training.evaluate import evaluate
from client.training.train import train_stage
from common.losses import pos_weight_from_counts
from common.model import build_joint_model, half_state_dict, load_half_state_dict, norm_state_keys
from common.presets import PRESETS, get_preset
from common.records import HALF_OF_STAGE, TrainInstruction, record_bytes, state_to_record
from common.runtime import use_torch_threads
from server.server_config import ServerRunConfig
from simulations.engine import SimulationEngine
from simulations.sites import discover_sites, prepare_caches

REPO = Path(__file__).resolve().parents[1]

BIN = Path(sys.executable).parent


# --- 1. overhead ------------------------------------------------------------------------------


def write_figures(path: Path | None, figures: dict) -> None:
    """Write a benchmark's figures as JSON to ``path`` (its folder made as needed); nothing when None."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=1))


def local_equivalent(rc: dict, n_sites: int) -> dict[str, float]:
    """The federated run's local work, in one process, without Flower. Returns seconds."""
    server, site_run = ServerRunConfig.from_run_config(rc), SiteRunConfig.from_run_config(rc)
    root = Path(site_run.config.data.root)
    sites = [open_site(SiteNode(partition_site(root, i), f"p{i}", root / ".cache"), site_run) for i in range(n_sites)]
    glob = build_joint_model(server.model, seed=server.seed)
    models = [build_joint_model(server.model, seed=server.seed) for _ in sites]
    counts = [site_label_counts(s.train, server.model) for s in sites]
    pos_weight = pos_weight_from_counts(
        np.sum([c[0] for c in counts], 0), np.sum([c[1] for c in counts], 0), max_weight=server.max_pos_weight
    )
    train_s = eval_s = 0.0
    round_s = []
    for rnd in range(1, server.total_rounds + 1):
        stage = server.stage_of(rnd)
        half = HALF_OF_STAGE[stage]
        t0 = time.perf_counter()
        states, weights = [], []
        for model, data in zip(models, sites):
            model.load_state_dict(glob.state_dict())
            cfg = site_run.train_config(
                TrainInstruction(
                    server_round=rnd,
                    stage=stage,
                    local_epochs=server.local_epochs,
                    local_steps=server.local_steps,
                    lr=server.lr if stage == 1 else server.lr_stage2,
                )
            )
            loader = cfg.loader(data.train, stage)
            result = train_stage(model, loader, stage, cfg, "cpu", pos_weight if stage == 2 else None)
            n = usable_examples(data.train, stage, server.model) if result.num_examples else 0
            if n:
                states.append(half_state_dict(model, half))
                weights.append(n)
        if states:
            avg = {k: sum(w * s[k].double() for w, s in zip(weights, states)) / sum(weights) for k in states[0]}
            load_half_state_dict(glob, half, avg)
        train_s += time.perf_counter() - t0
        t1 = time.perf_counter()
        for data in sites:
            evaluate(glob, data.test, "cpu", site_run.eval_batch_size)
        eval_s += time.perf_counter() - t1
        round_s.append(round(time.perf_counter() - t0, 2))
    return {"train_s": train_s, "evaluate_s": eval_s, "total_s": train_s + eval_s, "local_round_s": round_s}


def flwr_simulation(overrides: dict, n_sites: int, work: Path, cpus_per_site: int, total_cpus: int) -> dict[str, float]:
    """``flwr run`` of this app against a fresh simulation SuperLink (``simulations.engine``); wall seconds."""
    t0 = time.perf_counter()
    with SimulationEngine(work, cpus_per_site=cpus_per_site, total_cpus=total_cpus) as engine:
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.run(overrides, n_sites, work / "flwr-run.log")
        seconds = time.perf_counter() - t0
    history = json.loads(next(Path(overrides["output.dir"]).glob("*/history.json")).read_text())
    return {
        "superlink_startup_s": startup,
        "flwr_run_s": seconds,
        "round_s": [round(r["seconds"], 2) for r in history["rounds"]],
    }


# --- 2. bytes -----------------------------------------------------------------------------------


def bytes_per_round(preset: str, image_size: int | None = None) -> dict[str, int]:
    """ArrayRecord bytes one site sends and receives per round, as the ServerApp schedules them."""
    model = build_joint_model(get_preset(preset, **({"image_size": image_size} if image_size else {})), seed=0)
    size = lambda state, exclude=(): record_bytes(state_to_record(state, exclude))  # noqa: E731
    unet, clf = half_state_dict(model, "unet"), half_state_dict(model, "classifier")
    norms = norm_state_keys(model)
    return {
        "full_model": size(model.state_dict()),
        "stage1_train_down": size(unet),
        "stage1_train_up": size(unet),
        "stage1_evaluate_down": size(unet),
        "stage2_first_train_down": size(clf) + size(unet),
        "stage2_train_down": size(clf),
        "stage2_train_up": size(clf),
        "stage2_evaluate_down": size(clf),
        "fedbn_stage1_up": size(unet, norms),
        "fedbn_stage2_up": size(clf, norms),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "synthetic", help="folder of site folders")
    p.add_argument("-c", "--run-config", default="", help="run-config overrides, as flwr run -c takes them")
    p.add_argument("--threads", type=int, default=1, help="torch threads, and Ray CPUs, for both timings")
    p.add_argument(
        "--parallel",
        action="store_true",
        help="Flower: every CPU, one per site (several sites train "
        "at a time); without Flower: one process with as many torch threads",
    )
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-bytes", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    figures: dict = {}
    if not args.skip_overhead:
        overrides = {
            **(parse_config_args([args.run_config]) if args.run_config else {}),
            "data.root": str(args.data.resolve()),
        }
        with tempfile.TemporaryDirectory() as tmp:
            overrides["output.dir"] = str(Path(tmp) / "runs")
            rc = dict(get_fused_config_from_dir(REPO, overrides))
            n_sites = len(discover_sites(args.data))
            t0 = time.perf_counter()
            site_run = SiteRunConfig.from_run_config(rc)
            prepare_caches(args.data, site_run.preprocess, progress=False)
            print(f"site caches ready ({time.perf_counter() - t0:.1f} s, not timed below)")
            cpus = os.cpu_count() or 1
            use_torch_threads(cpus if args.parallel else args.threads)
            local = local_equivalent(rc, n_sites)
            fed = (
                flwr_simulation(overrides, n_sites, Path(tmp), 1, cpus)
                if args.parallel
                else flwr_simulation(overrides, n_sites, Path(tmp), args.threads, args.threads)
            )
        server = ServerRunConfig.from_run_config(rc)
        figures["overhead"] = {
            "sites": n_sites,
            "rounds": [server.rounds_stage1, server.rounds_stage2],
            "preset": site_run.config.model.preset,
            "image_size": server.model.image_size,
            "local_steps": server.local_steps,
            "batch_size": site_run.batch_size,
            "torch_threads": torch.get_num_threads(),
            "parallel_sites": args.parallel,
            **local,
            **fed,
            "overhead": fed["flwr_run_s"] / local["total_s"],
            "overhead_vs_training_only": fed["flwr_run_s"] / local["train_s"],
        }
        o = figures["overhead"]
        print(
            f"\n{n_sites} sites, {o['rounds'][0]}+{o['rounds'][1]} rounds, {o['preset']} {o['image_size']}px, "
            f"{o['local_steps']} local steps x batch {o['batch_size']}, {o['torch_threads']} torch thread(s)"
        )
        print(f"  without Flower: train {o['train_s']:.1f} s + evaluate {o['evaluate_s']:.1f} s = {o['total_s']:.1f} s")
        print(
            f"  flwr run:       {o['flwr_run_s']:.1f} s (SuperLink start-up {o['superlink_startup_s']:.1f} s, not included)"
        )
        rounds = o["round_s"]
        print(
            f"  flwr rounds:    {' '.join(f'{r:.1f}' for r in rounds)} s (the first one starts Ray and the site process); "
            f"outside the rounds {o['flwr_run_s'] - sum(rounds):.1f} s"
        )
        o["overhead_rounds_2_to_n"] = sum(rounds[1:]) / sum(o["local_round_s"][1:]) if len(rounds) > 1 else float("nan")
        print(
            f"  overhead:       {o['overhead']:.2f}x (vs training alone {o['overhead_vs_training_only']:.2f}x); "
            f"rounds 2..N alone: {o['overhead_rounds_2_to_n']:.2f}x"
        )
    if not args.skip_bytes:
        figures["bytes"] = {name: bytes_per_round(name) for name in PRESETS}
        print("\nbytes per site per round (ArrayRecord payload, MB):")
        keys = list(next(iter(figures["bytes"].values())))
        print(f"  {'':26s}" + "".join(f"{name:>10s}" for name in figures["bytes"]))
        for key in keys:
            print(f"  {key:26s}" + "".join(f"{b[key] / 1e6:10.2f}" for b in figures["bytes"].values()))
        for name, b in figures["bytes"].items():
            print(
                f"  {name}: stage-1 round = {b['stage1_train_down'] / b['full_model']:.0%} of the full model each way, "
                f"stage-2 round = {b['stage2_train_down'] / b['full_model']:.0%}"
            )
    write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
