"""Robustness to faulty sites: the server rejects non-finite updates (server.validation), and the robust strategies
bound what one or two attackers (client.simulation.faults) do to the aggregate, where FedAvg is pulled away.

Strategy checks build replies by hand from the model's real stage halves and check the aggregate
numerically; in-process runs (FakeGrid, the simulation's ClientApp: the real handlers plus its fault
injection) have a site sending NaN or inflating its weight.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType

from client.data.cache import build_site_cache
from client.simulation.app import app as simulation_app
from client.simulation.faults import corrupt_update
from client.simulation.partitions import Partition, write_partitions
from common.checkpoint import load_checkpoint
from common.model import build_joint_model, half_state_dict, load_half_state_dict
from common.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS
from common.run_config import model_from_run_config
from server.checkpoints import round_checkpoints
from server.federation import run_federation
from server.strategies import build_strategy
from server.validation import ArraySpec, Problem, check_arrays
from tests.helpers.data import write_site
from tests.helpers.flower import FakeGrid, make_context, make_reply, run_config, set_task_identity, strategy_options

IMAGE = 32
RC = run_config(**{"model.image-size": IMAGE})
MODEL_CFG, PREPROCESS = model_from_run_config(RC)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def test_check_arrays_names_the_floating_arrays_with_nan_or_inf():
    record = ArrayRecord(
        {
            "a": Array(np.ones(3, np.float32)),
            "b": Array(np.array([1.0, np.nan], np.float32)),
            "c": Array(np.array([np.inf], np.float64)),
            "d": Array(np.array([5], np.int64)),
            "e": Array(np.array([-np.inf, 0.0], np.float16)),
        }
    )
    specs = {k: ArraySpec(tuple(a.shape), str(a.dtype)) for k, a in record.items()}
    assert check_arrays(record, specs) == [Problem("array-non-finite", k) for k in ("b", "c", "e")]
    assert check_arrays(ArrayRecord({"a": Array(np.zeros(2, np.float32))}), {"a": ArraySpec((2,), "float32")}) == []


# --- robust strategies on the model's real halves ------------------------------------------

N_HONEST = 11
ATTACKS = {"scale": {"kind": "scale", "factor": 50.0}, "sign-flip": {"kind": "sign-flip", "factor": 20.0}}


@pytest.fixture(scope="module")
def halves() -> dict[str, dict[str, torch.Tensor]]:
    model = build_joint_model(MODEL_CFG, seed=0)
    return {half: half_state_dict(model, half) for half in ("unet", "classifier")}


def honest_states(glob: dict[str, torch.Tensor], n: int = N_HONEST, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Sites that moved the global half the same way (a shared drift) plus their own scatter."""
    g = torch.Generator().manual_seed(seed)
    drift = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in glob.items() if v.is_floating_point()}
    out = []
    for _ in range(n):
        out.append(
            {
                k: (v + drift[k] + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
                for k, v in glob.items()
            }
        )
    return out


def replies_of(states: list[dict[str, torch.Tensor]], sizes: list[int]) -> list:
    return [
        make_reply({k: v.numpy() for k, v in s.items()}, {NUM_EXAMPLES: n, TRAIN_LOSS: 0.1}, node_id=100 + i)
        for i, (s, n) in enumerate(zip(states, sizes))
    ]


def aggregate(name: str, states, sizes, **kw) -> dict[str, np.ndarray]:
    strategy = build_strategy(strategy_options(name=name, **kw))
    arrays, _ = strategy.aggregate_train(1, replies_of(states, sizes))
    return {k: v.numpy() for k, v in arrays.items()}


def floats(state) -> list[str]:
    return [k for k, v in state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def stack(states, key) -> np.ndarray:
    return np.stack([s[key].numpy() for s in states]).astype(np.float64)


def distance(a: dict, b: dict, keys) -> float:
    return float(np.sqrt(sum(((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2).sum() for k in keys)))


@pytest.mark.parametrize("half", ["unet", "classifier"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_fedmedian_stays_with_the_honest_sites_where_fedavg_is_pulled_away(halves, half, attack):
    """One attacker of 12, claiming 10x the slices: every coordinate of the median lies between
    the honest sites' 5th and 7th values (a median of 12 with one outlier), so it is within the
    honest scatter of the honest median; FedAvg moves more than 10x that far."""
    glob = halves[half]
    honest = honest_states(glob)
    bad = corrupt_update(glob, honest_states(glob, 1, seed=9)[0], ATTACKS[attack])
    sizes = [20] * N_HONEST + [200]
    median = aggregate("fedmedian", honest + [bad], sizes)
    avg = aggregate("fedavg", honest + [bad], sizes)
    keys = floats(glob)
    for k in keys:
        ordered = np.sort(stack(honest, k), axis=0)
        assert np.all(median[k] >= ordered[4] - 1e-6) and np.all(median[k] <= ordered[6] + 1e-6), k
    honest_median = {k: np.median(stack(honest, k), axis=0) for k in keys}
    honest_avg = {k: np.average(stack(honest, k), axis=0, weights=sizes[:-1]) for k in keys}
    moved_median, moved_avg = distance(median, honest_median, keys), distance(avg, honest_avg, keys)
    assert moved_avg > 10 * moved_median
    # FedAvg gives the attacker its claimed 200 of 420 slices' weight; the median ignores the claim.
    for k in keys:
        expected = honest_avg[k] + 200 / 420 * (bad[k].numpy().astype(np.float64) - honest_avg[k])
        np.testing.assert_allclose(avg[k], expected, rtol=1e-4, atol=1e-5)
    model = build_joint_model(MODEL_CFG, seed=0)
    load_half_state_dict(model, half, median)  # a half the server can load, int buffers included


@pytest.mark.parametrize("beta, n_bad", [(0.1, 1), (0.2, 2)])
def test_fedtrimmedavg_cuts_floor_beta_n_attackers_per_side(halves, beta, n_bad):
    """beta * 12 sites cut at each end: up to floor(beta * 12) attackers leave the honest range."""
    glob = halves["classifier"]
    honest = honest_states(glob, 12 - n_bad)
    attackers = [corrupt_update(glob, s, ATTACKS["scale"]) for s in honest_states(glob, n_bad, seed=9)]
    sizes = [20] * 12
    trimmed = aggregate("fedtrimmedavg", honest + attackers, sizes, trim_beta=beta)
    avg = aggregate("fedavg", honest + attackers, sizes)
    keys = floats(glob)
    for k in keys:
        values = stack(honest, k)
        # The attackers may sit on either side of a coordinate, so the trimmed mean stays inside
        # the honest range (it can lose honest values on the other side, not gain an attacker's).
        assert np.all(trimmed[k] >= values.min(axis=0) - 1e-6) and np.all(trimmed[k] <= values.max(axis=0) + 1e-6), k
    honest_avg = {k: stack(honest, k).mean(axis=0) for k in keys}
    assert distance(avg, honest_avg, keys) > 10 * distance(trimmed, honest_avg, keys)


def test_fedtrimmedavg_with_too_small_beta_lets_an_attacker_through(halves):
    """beta 0.05 of 12 sites cuts nothing (floor 0.6 = 0): it is FedAvg without the weights."""
    glob = halves["classifier"]
    honest = honest_states(glob)
    bad = corrupt_update(glob, honest_states(glob, 1, seed=9)[0], ATTACKS["scale"])
    trimmed = aggregate("fedtrimmedavg", honest + [bad], [20] * 12, trim_beta=0.05)
    for k in floats(glob):
        np.testing.assert_allclose(trimmed[k], stack(honest + [bad], k).mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("half", ["unet", "classifier"])
def test_krum_with_num_malicious_2_of_12_picks_an_honest_site(halves, half):
    """Two attackers (scaled, sign-flipped) of 12 and num-malicious 2: Krum returns one honest
    site's half exactly, whatever slice counts the attackers claim."""
    glob = halves[half]
    honest = honest_states(glob, 10)
    pair = honest_states(glob, 2, seed=9)
    attackers = [corrupt_update(glob, pair[0], ATTACKS["scale"]), corrupt_update(glob, pair[1], ATTACKS["sign-flip"])]
    states, sizes = honest + attackers, [20] * 10 + [1000, 1000]
    chosen = aggregate("krum", states, sizes, num_malicious=2)
    keys = floats(glob)
    matches = [
        i for i, s in enumerate(states) if all(np.allclose(chosen[k], s[k].numpy(), rtol=1e-6, atol=1e-7) for k in keys)
    ]
    assert len(matches) == 1 and matches[0] < 10
    # Krum's pick is one site's half: its distance to the honest mean is that site's own scatter.
    honest_avg = {k: stack(honest, k).mean(axis=0) for k in keys}
    avg = aggregate("fedavg", states, sizes)
    assert distance(avg, honest_avg, keys) > 10 * distance(chosen, honest_avg, keys)


# --- the server rejects a NaN site in a run -------------------------------------------------

N_SITES = 3


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("robust")
    out = []
    for i in range(N_SITES):
        data = write_site(root / "data" / f"site-{i + 1:02d}", n_studies=5, shape=(4, 40, 40), seed=10 * i)
        cache, _ = build_site_cache(data, root / "cache", PREPROCESS)
        out.append(str(cache.path))
    return out


def fault_run(tmp_path, caches, faults: list[dict], stage2: int, **overrides):
    """A 1 + ``stage2`` round run of site-01.. with ``faults`` (one per site) on the simulation's ClientApp
    (``client.simulation.app``: the deployed handlers plus fault injection): (grid, history, run config)."""
    parts = [Partition(f"site-{i + 1:02d}", c, f) for i, (c, f) in enumerate(zip(caches, faults, strict=True))]
    manifest = write_partitions(tmp_path / "parts.json", parts)
    rc = run_config(
        **{
            "data.partitions": str(manifest),
            "output.dir": str(tmp_path / "runs"),
            "output.name": "run",
            "model.image-size": IMAGE,
            "train.local-steps": 1,
            "train.batch-size": 4,
            "rounds.stage1": 1,
            "rounds.stage2": stage2,
            **overrides,
        }
    )
    grid = FakeGrid(
        {100 + i: (simulation_app, make_context({"partition-id": i}, rc, node_id=100 + i)) for i in range(len(parts))}
    )
    return grid, run_federation(grid, rc), rc


def train_replies(grid: FakeGrid, rnd: int) -> dict:
    """node -> its train reply of round ``rnd``, as the grid delivered it."""
    return {
        s.message.metadata.dst_node_id: s.reply
        for s in grid.log
        if s.message.metadata.message_type == MessageType.TRAIN and s.message.content[CONFIG][SERVER_ROUND] == rnd
    }


def test_a_nan_site_is_rejected_and_the_global_model_is_the_honest_average(caches, tmp_path, caplog):
    """site-02 sends NaN every round: each round logs and records the rejection, and the global
    half equals FedAvg of site-01 and site-03 (weighted by num-examples)."""
    with caplog.at_level(logging.WARNING, logger="flwr"):
        grid, history, _ = fault_run(tmp_path, caches, [{}, {"kind": "nan"}, {}], stage2=1)
    for rnd in (1, 2):
        assert "train: site-02 (node 101) reply rejected: rule array-non-finite, key " in caplog.text
        entry = history.rounds[rnd - 1]
        assert [(r["site"], r["node"], r["phase"]) for r in entry["rejected"]] == [("site-02", 101, "train")]
        assert entry["rejected"][0]["rule"] == "array-non-finite" and entry["rejected"][0]["n_problems"] > 1
        assert entry["failures"] == [] and not entry.get("skipped")
        assert sorted(entry["train"]["sites"]) == ["site-01", "site-03"]  # nothing of a rejected reply is kept
    checkpoints = [load_checkpoint(p).state_dict for p in round_checkpoints(tmp_path / "runs" / "run")]
    for rnd, prefix in ((1, "unet."), (2, "classifier.")):
        replies = train_replies(grid, rnd)
        honest = [replies[100], replies[102]]
        weights = [float(r.content[METRICS][NUM_EXAMPLES]) for r in honest]
        state = checkpoints[rnd - 1]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        arrays = [{k: a.numpy() for k, a in r.content[ARRAYS].items()} for r in honest]
        keys = [k for k in arrays[0] if k.startswith(prefix) and np.issubdtype(arrays[0][k].dtype, np.floating)]
        assert keys and all(np.isnan(replies[101].content[ARRAYS][k].numpy()).all() for k in keys)
        for k in keys:
            expected = np.average(np.stack([a[k] for a in arrays]), axis=0, weights=weights)
            np.testing.assert_allclose(state[k].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_too_few_finite_updates_skip_the_round(halves, tmp_path, caches):
    """With min-train-nodes 2 and two of three sites sending NaN, the round keeps the previous model."""
    _, history, rc = fault_run(tmp_path, caches, [{"kind": "nan", "value": "inf"}, {"kind": "nan"}, {}], stage2=0)
    entry = history.rounds[0]
    assert sorted(r["site"] for r in entry["rejected"]) == ["site-01", "site-02"] and entry["skipped"] is True
    init = build_joint_model(MODEL_CFG, seed=int(rc["seed"])).state_dict()
    final = load_checkpoint(round_checkpoints(tmp_path / "runs" / "run")[0]).state_dict
    assert all(torch.equal(init[k], final[k]) for k in init)


# --- weight inflation -------------------------------------------------------------------------


def test_an_inflating_site_is_weighted_by_its_bound(caches, tmp_path):
    """site-03 claims 1000x its slices. Stage 1: its weight is capped at 10x the median of the
    others' claims; stage 2: at the training slices it declared in the counts round. The global
    half is FedAvg with those weights, computed here from the replies the grid delivered."""
    grid, history, _ = fault_run(tmp_path, caches, [{}, {}, {"kind": "inflate", "factor": 1000}], stage2=1)
    declared = {
        s.message.metadata.dst_node_id: float(s.reply.content[METRICS][NUM_EXAMPLES])
        for s in grid.log
        if s.message.metadata.message_type == MessageType.QUERY
    }
    checkpoints = [load_checkpoint(p).state_dict for p in round_checkpoints(tmp_path / "runs" / "run")]
    for rnd, prefix in ((1, "unet."), (2, "classifier.")):
        replies = train_replies(grid, rnd)
        claims = {n: float(r.content[METRICS][NUM_EXAMPLES]) for n, r in replies.items()}
        assert claims[102] >= 1000  # the fault's claim reached the server
        bound = 10 * np.median([claims[100], claims[101]])
        if rnd == 2:
            bound = min(bound, declared[102])
        weights = [claims[100], claims[101], min(claims[102], bound)]
        assert weights[2] < claims[102]
        entry = history.rounds[rnd - 1]
        assert entry["capped"] == [{"site": "site-03", "node": 102, "key": NUM_EXAMPLES, "weight": int(weights[2])}]
        assert entry["rejected"] == []
        arrays = [{k: a.numpy() for k, a in replies[n].content[ARRAYS].items()} for n in (100, 101, 102)]
        keys = [k for k in arrays[0] if k.startswith(prefix) and np.issubdtype(arrays[0][k].dtype, np.floating)]
        for k in keys:
            expected = np.average(np.stack([a[k] for a in arrays]), axis=0, weights=weights)
            np.testing.assert_allclose(checkpoints[rnd - 1][k].numpy(), expected, rtol=1e-5, atol=1e-6)
