"""Secure aggregation of model updates (common/secure_updates.py): sites simulated in-process.

The weighted mean is checked against numpy's own weighted average of the updates (nothing is
clipped: learnable weights travel mod 2^32 within +-RANGE, running statistics mod 2^64 within
+-WIDE_RANGE, a value beyond its range is refused); the precision bound is the fixed point's (each
site rounds each value once, by at most 2^-(f+1) of its ring).
"""

from __future__ import annotations

import numpy as np
import pytest

from common.secure_sum import MODULUS, SecureSumError, generate_key_pair
from common.secure_updates import (
    FRACTION_BITS,
    MAX_WEIGHT,
    RANGE,
    WIDE_FRACTION_BITS,
    WIDE_RANGE,
    Reveal,
    Rings,
    decode_sum,
    encode_update,
    make_shares,
    mask_update,
    new_self_seed,
    reveal,
    threshold,
    unmask_updates,
)
from common.secure_updates import flatten as flatten_state

SESSION = "updates-3-1"


def run_round(updates: dict[int, np.ndarray], examples: dict[int, int], lost_after_shares=(), rings=None):
    """Keys, shares, masked updates (sites in ``lost_after_shares`` never send theirs), unmask."""
    rings = rings or Rings.narrow_only(next(iter(updates.values())).size)
    keys = {n: generate_key_pair() for n in updates}
    peers = {n: pub for n, (_, pub) in keys.items()}
    seeds = {n: new_self_seed() for n in updates}
    boxes = {n: make_shares(n, keys[n][0], seeds[n], peers, SESSION) for n in updates}
    inbox = {r: {s: boxes[s][r] for s in updates} for r in updates}  # what the server relays to r
    masked = {
        n: mask_update(encode_update(u, examples[n], rings), n, keys[n][0], seeds[n], peers, SESSION, rings.narrow)
        for n, u in updates.items()
        if n not in lost_after_shares
    }
    alive, gone = sorted(masked), sorted(lost_after_shares)
    reveals = [Reveal(*reveal(n, keys[n][0], peers, SESSION, inbox[n], alive, gone)) for n in alive]
    return masked, decode_sum(unmask_updates(masked, reveals, peers, SESSION, rings.narrow), rings)


def weighted_mean(updates, examples, nodes):
    w = np.array([min(examples[n], MAX_WEIGHT) for n in nodes], float)
    return np.average(np.stack([updates[n] for n in nodes]), axis=0, weights=w)


def make_updates(n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes = [int(v) for v in rng.choice(10**6, size=n, replace=False)]
    updates = {v: rng.normal(0, 0.05, length) for v in nodes}
    updates[nodes[0]][:3] = [RANGE, -RANGE, 0.9]  # the ends of the narrow range, and within it
    examples = {v: int(rng.integers(1, 5000)) for v in nodes}
    return updates, examples


def half_with_statistics() -> tuple[dict[str, np.ndarray], Rings]:
    """A half's layout: conv weights (narrow), a BatchNorm's running statistics and counter (wide)."""
    half = {
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.ones(4, np.float32),
        "bn.num_batches_tracked": np.zeros((), np.int64),
        "conv.weight": np.zeros((3, 5), np.float32),
    }
    _, layout = flatten_state(half)
    return half, Rings.of(layout)


def test_unmasked_sum_is_the_weighted_average_to_fixed_point_precision():
    updates, examples = make_updates(12, 500)
    masked, (weight, mean) = run_round(updates, examples)
    nodes = sorted(updates)
    assert weight == sum(min(e, MAX_WEIGHT) for e in examples.values()) / MAX_WEIGHT  # exact: the wide ring
    bound = 12 * 2.0 ** -(FRACTION_BITS + 1) / weight * 1.01 + 1e-12
    assert np.max(np.abs(mean - weighted_mean(updates, examples, nodes))) <= bound
    assert mean[0] != pytest.approx(weighted_mean({k: v * 0 for k, v in updates.items()}, examples, nodes)[0])


def test_running_statistics_and_counters_travel_unclipped_in_the_wide_ring():
    """Running statistics moving by far more than the narrow range (up to WIDE_RANGE) and the step
    counter come out as their weighted mean to the wide ring's 2^-33 per site; weights stay narrow."""
    half, rings = half_with_statistics()
    assert rings.narrow == 15 and rings.words == 15 + 2 * (1 + 9)
    rng = np.random.default_rng(5)
    nodes = [7, 3, 11, 20]
    updates, examples = {}, {}
    for i, n in enumerate(nodes):
        moved = {
            "bn.running_mean": rng.normal(0, 3, 4),
            "bn.running_var": rng.uniform(-2, 40, 4) * (1 + 1000 * (i == 0)),
            "bn.num_batches_tracked": np.array(16.0),
            "conv.weight": rng.uniform(-RANGE, RANGE, (3, 5)),
        }
        moved["bn.running_var"][0] = WIDE_RANGE if i == 1 else moved["bn.running_var"][0]
        updates[n], examples[n] = flatten_state(moved)[0], int(rng.integers(1, 200))
    _, (weight, mean) = run_round(updates, examples, rings=rings)
    expected = weighted_mean(updates, examples, nodes)
    wide, narrow = rings.wide, ~rings.wide
    assert np.max(np.abs(mean[wide] - expected[wide])) <= 4 * 2.0 ** -(WIDE_FRACTION_BITS + 1) / weight * 1.01
    assert np.max(np.abs(mean[narrow] - expected[narrow])) <= 4 * 2.0 ** -(FRACTION_BITS + 1) / weight * 1.01
    assert np.max(np.abs(expected[wide])) > 1000 * RANGE  # what a +-1 clip would have cut
    counter = [k for k, _, _ in flatten_state(half)[1]].index("bn.num_batches_tracked")  # first in key order
    assert mean[counter] == 16.0  # exact: w * 16 has 16 fraction bits, the wide ring 32


@pytest.mark.parametrize(
    "key, value", [("conv.weight", RANGE * 1.0001), ("bn.running_var", -WIDE_RANGE * 1.0001), ("conv.weight", np.nan)]
)
def test_a_value_beyond_its_public_range_is_refused_never_clipped(key, value):
    half, rings = half_with_statistics()
    moved = {k: np.zeros(np.shape(v)) for k, v in half.items()}
    moved[key].flat[0] = value
    with pytest.raises(SecureSumError, match="beyond its public range"):
        encode_update(flatten_state(moved)[0], 100, rings)


def test_each_masked_vector_looks_like_noise_to_the_server():
    """The server's view of one site: uniform on [0, 2^32) whatever the update (a zero update here),
    uncorrelated with the encoded values, and different for two sites sending the same update."""
    updates, examples = make_updates(4, 20_000, seed=1)
    same = np.zeros(20_000)
    a, b = sorted(updates)[:2]
    updates[a], updates[b] = same, same.copy()
    masked, _ = run_round(updates, examples)
    for node, vec in masked.items():
        u = np.asarray(vec, float) / MODULUS
        counts = np.histogram(u, bins=16, range=(0, 1))[0]
        chi2 = float(((counts - u.size / 16) ** 2 / (u.size / 16)).sum())
        assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 50
        plain = encode_update(updates[node], examples[node]).astype(float)
        assert abs(np.corrcoef(plain, u)[0, 1]) < 0.05
    assert np.mean(masked[a] == masked[b]) < 0.01


@pytest.mark.parametrize("lost", [1, 2])
def test_sites_lost_after_masking_still_give_the_survivors_sum(lost):
    updates, examples = make_updates(5, 300, seed=2)
    gone = sorted(updates)[1 : 1 + lost]  # a middle node: its masks were added by some, subtracted by others
    _, (weight, mean) = run_round(updates, examples, lost_after_shares=gone)
    alive = [n for n in sorted(updates) if n not in gone]
    assert weight == sum(examples[n] for n in alive) / MAX_WEIGHT
    assert np.max(np.abs(mean - weighted_mean(updates, examples, alive))) <= 5 * 2.0**-FRACTION_BITS / weight


def test_too_few_sites_or_survivors_or_a_double_request_is_refused():
    keys = {n: generate_key_pair() for n in (1, 2)}
    peers = {n: pub for n, (_, pub) in keys.items()}
    with pytest.raises(SecureSumError, match="between 3 and"):
        make_shares(1, keys[1][0], new_self_seed(), peers, SESSION)
    keys = {n: generate_key_pair() for n in (1, 2, 3, 4)}
    peers = {n: pub for n, (_, pub) in keys.items()}
    boxes = {n: make_shares(n, keys[n][0], new_self_seed(), peers, SESSION) for n in peers}
    inbox = {s: boxes[s][1] for s in peers}
    assert threshold(4) == 3
    with pytest.raises(SecureSumError, match="survivors and dropped"):  # node 2 as both: key and seed
        reveal(1, keys[1][0], peers, SESSION, inbox, [1, 2, 3], [2, 4])
    with pytest.raises(SecureSumError, match="2 survivors, 3 needed"):
        reveal(1, keys[1][0], peers, SESSION, inbox, [1, 2], [3, 4])
    masked = {n: np.zeros(3, np.uint64) for n in (1, 2, 3)}
    with pytest.raises(SecureSumError, match="2 site\\(s\\) answered the unmask step, 3 needed"):
        unmask_updates(masked, [Reveal({}, {}), Reveal({}, {})], peers, SESSION)
