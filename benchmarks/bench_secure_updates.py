"""What secure aggregation of model updates costs per round at 12 sites (docs/secure-aggregation.md).

One round of the U-Net half (stage 1), plain FedAvg beside ``privacy.secure-updates``:

- bytes: what crosses the network per round, all sites together, both directions: the half sent to
  every site and its reply (float32 arrays, or the masked uint32 vector), plus, for the secure round,
  the keys, the encrypted shares (relayed by the server: up and down) and the unmask answers.
  Serialised array bytes and the raw bytes of keys and shares; Flower's message framing is left out
  of both (it is the same few hundred bytes per message).
- seconds: sites work in parallel, so a round's wall time is one site's work plus the server's:
  ``local training`` (measured here: ``--steps`` steps of the tiny preset at 64 px, batch 8, on
  random slices) + the site's secure work (key pair, 12 Shamir share pairs, encoding, 11 pairwise
  and one self mask, the unmask answer) + the server's (FedAvg over 12 replies, or the unmasking:
  12 self masks and, with a dropout, 11 pairwise masks per lost site). Message round trips are not
  in it: the secure round has 3 more query exchanges (keys, shares, unmask), each a few hundred ms
  on a real network.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.bench_secure_updates [--preset tiny] [--steps 16] [--dropped 1]``.
Output: benchmarks/results/secure_updates.txt.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common.runtime import use_torch_threads


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def local_round_seconds(preset: str, size: int, steps: int) -> float:
    """One site's local training for a round: ``steps`` stage-1 steps, batch 8, random slices."""
    from client.training.train import TrainConfig, train_stage
    from common.model import build_joint_model
    from common.presets import get_preset

    model = build_joint_model(get_preset(preset, image_size=size), seed=0)
    g = torch.Generator().manual_seed(0)
    n = 8 * steps
    data = [
        {
            "image": (torch.rand(size, size, generator=g) * 255).to(torch.uint8),
            "mask": (torch.rand(size, size, generator=g) > 0.9).to(torch.uint8),
            "labels": torch.zeros(5),
            "mask_known": torch.tensor(True),
            "study": torch.tensor(i),
        }
        for i in range(n)
    ]
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    cfg = TrainConfig(max_steps=steps, batch_size=8, augment=True, balanced=False, schedule="constant")
    train_stage(model, loader, 1, TrainConfig(max_steps=1, batch_size=8, balanced=False), "cpu")  # warm-up
    return train_stage(model, loader, 1, cfg, "cpu").seconds


def unet_half(preset: str, size: int) -> dict[str, np.ndarray]:
    from common.model import build_joint_model, half_state_dict
    from common.presets import get_preset

    model = build_joint_model(get_preset(preset, image_size=size), seed=0)
    return {k: v.numpy() for k, v in half_state_dict(model, "unet").items()}


def plain_round(half: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], examples: list[int]):
    """Bytes of a plain round and the server's FedAvg seconds (Flower's own weighted average)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from common.records import ARRAYS, METRICS, NUM_EXAMPLES

    contents = [
        RecordDict(
            {
                ARRAYS: ArrayRecord({k: Array(np.asarray(half[k] + u[k], dtype=half[k].dtype)) for k in half}),
                METRICS: MetricRecord({NUM_EXAMPLES: n}),
            }
        )
        for u, n in zip(updates, examples)
    ]
    _, seconds = _timed(aggregate_arrayrecords, contents, NUM_EXAMPLES)
    one = sum(len(a.data) for a in contents[0][ARRAYS].values())
    return {"bytes": 2 * len(updates) * one, "one": one, "server_seconds": seconds}


def secure_round(half_bytes: int, updates: list[dict[str, np.ndarray]], examples: list[int], dropped: int) -> dict:
    """Bytes and seconds of the secure round's protocol, sites simulated in-process (one timed);
    ``half_bytes``: the serialised half every site receives (as in the plain round)."""
    from flwr.app import Array

    from common.secure_sum import generate_key_pair
    from common.secure_updates import (
        Reveal,
        Rings,
        decode_sum,
        encode_update,
        flatten,
        make_shares,
        mask_update,
        new_self_seed,
        reveal,
        unmask_updates,
    )

    n, session = len(updates), "updates-1-1"
    nodes = list(range(1, n + 1))
    site_seconds = {node: 0.0 for node in nodes}
    keys = {}
    for node in nodes:
        keys[node], s = _timed(generate_key_pair)
        site_seconds[node] += s
    peers = {node: keys[node][1] for node in nodes}
    seeds = {node: new_self_seed() for node in nodes}
    boxes = {}
    for node in nodes:
        boxes[node], s = _timed(make_shares, node, keys[node][0], seeds[node], peers, session)
        site_seconds[node] += s
    lost = nodes[:dropped]
    masked = {}
    rings = Rings.of(flatten(updates[0])[1])
    for node, u, ex in zip(nodes, updates, examples):
        if node in lost:
            continue
        (vec, _), s1 = _timed(flatten, u)
        masked[node], s2 = _timed(
            mask_update, encode_update(vec, ex, rings), node, keys[node][0], seeds[node], peers, session, rings.narrow
        )
        site_seconds[node] += s1 + s2
    alive = sorted(masked)
    reveals = []
    for node in alive:
        inbox = {s: boxes[s][node] for s in nodes}
        r, s = _timed(reveal, node, keys[node][0], peers, session, inbox, alive, lost)
        reveals.append(Reveal(*r))
        site_seconds[node] += s
    (weight, mean), server_seconds = _timed(
        lambda: decode_sum(unmask_updates(masked, reveals, peers, session, rings.narrow), rings)
    )
    share_bytes = sum(len(b) for per in boxes.values() for b in per.values())
    reveal_bytes = sum(len(b) for r in reveals for b in [*r.seeds.values(), *r.keys.values()])
    masked_bytes = len(Array(next(iter(masked.values())).astype(np.uint32)).data)
    bytes_ = {
        "model down": n * half_bytes,
        "masked up": len(masked) * masked_bytes,
        "keys": n * 32 + n * n * (32 + 8),  # up, then every peer list down (key + node id)
        "shares": 2 * share_bytes,  # up to the server, relayed down to their receivers
        "unmask": len(alive) * 8 * n + reveal_bytes,  # survivor/dropped lists down, shares up
    }
    return {
        "bytes": bytes_,
        "site_seconds": max(site_seconds.values()),
        "server_seconds": server_seconds,
        "weight": weight,
        "mean": mean,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sites", type=int, default=12)
    ap.add_argument("--steps", type=int, default=16, help="local steps per round (the default run config's)")
    ap.add_argument("--dropped", type=int, default=0, help="sites lost after masking")
    args = ap.parse_args()
    use_torch_threads(1)
    rng = np.random.default_rng(0)
    half = unet_half(args.preset, args.size)
    updates = [
        {
            k: (rng.normal(0, 1e-3, v.shape) if v.dtype.kind == "f" else np.zeros(v.shape)).astype(v.dtype)
            for k, v in half.items()
        }
        for _ in range(args.sites)
    ]
    examples = [int(v) for v in rng.integers(100, 3000, args.sites)]
    n_params = sum(v.size for v in half.values())
    train_s = local_round_seconds(args.preset, args.size, args.steps)
    plain = plain_round(half, updates, examples)
    secure = secure_round(plain["one"], updates, examples, args.dropped)
    from common.secure_updates import flatten

    alive = list(range(args.dropped, args.sites))
    w = np.array([examples[i] for i in alive], float)
    expected = np.average(np.stack([flatten(updates[i])[0] for i in alive]), axis=0, weights=w)
    err = float(np.max(np.abs(secure["mean"] - expected)))
    plain_s = train_s + plain["server_seconds"]
    secure_s = train_s + secure["site_seconds"] + secure["server_seconds"]
    secure_b = sum(secure["bytes"].values())
    print(
        f"U-Net half of the {args.preset} preset at {args.size} px: {n_params:,} values; {args.sites} sites, "
        f"{args.dropped} lost after masking; local training {args.steps} steps"
    )
    print(
        f"plain round : {plain['bytes'] / 1e6:8.2f} MB  {plain_s:7.3f} s  (training {train_s:.3f} s + FedAvg "
        f"{plain['server_seconds']:.3f} s)"
    )
    print(
        f"secure round: {secure_b / 1e6:8.2f} MB  {secure_s:7.3f} s  (training {train_s:.3f} s + one site's "
        f"protocol {secure['site_seconds']:.3f} s + unmasking {secure['server_seconds']:.3f} s)"
    )
    print("secure bytes: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in secure["bytes"].items()))
    print(f"ratio secure / plain: bytes {secure_b / plain['bytes']:.3f}x, seconds {secure_s / plain_s:.3f}x")
    print(
        f"max |secure mean - numpy weighted mean| = {err:.2e} (fixed point; plus 3 extra message round trips, "
        "not timed here)"
    )


if __name__ == "__main__":
    main()
