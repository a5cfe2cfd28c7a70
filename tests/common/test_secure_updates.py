"""Secure aggregation of model updates (common/secure_updates.py): sites simulated in-process.

The weighted mean is checked against numpy's own weighted average of the clipped updates; the
precision bound is the fixed point's (each site rounds each value once, by at most 2^-(f+1)).
"""

from __future__ import annotations

import numpy as np
import pytest

from common.secure_sum import MODULUS, SecureSumError, generate_key_pair
from common.secure_updates import (
    CLIP,
    FRACTION_BITS,
    MAX_WEIGHT,
    Reveal,
    decode_sum,
    encode_update,
    make_shares,
    mask_update,
    new_self_seed,
    reveal,
    threshold,
    unmask_updates,
)

SESSION = "updates-3-1"


def run_round(updates: dict[int, np.ndarray], examples: dict[int, int], lost_after_shares=()):
    """Keys, shares, masked updates (sites in ``lost_after_shares`` never send theirs), unmask."""
    keys = {n: generate_key_pair() for n in updates}
    peers = {n: pub for n, (_, pub) in keys.items()}
    seeds = {n: new_self_seed() for n in updates}
    boxes = {n: make_shares(n, keys[n][0], seeds[n], peers, SESSION) for n in updates}
    inbox = {r: {s: boxes[s][r] for s in updates} for r in updates}  # what the server relays to r
    masked = {
        n: mask_update(encode_update(u, examples[n]), n, keys[n][0], seeds[n], peers, SESSION)
        for n, u in updates.items()
        if n not in lost_after_shares
    }
    alive, gone = sorted(masked), sorted(lost_after_shares)
    reveals = [Reveal(*reveal(n, keys[n][0], peers, SESSION, inbox[n], alive, gone)) for n in alive]
    return masked, decode_sum(unmask_updates(masked, reveals, peers, SESSION))


def weighted_mean(updates, examples, nodes):
    w = np.array([min(examples[n], MAX_WEIGHT) for n in nodes], float)
    return np.average(np.stack([np.clip(updates[n], -CLIP, CLIP) for n in nodes]), axis=0, weights=w)


def make_updates(n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nodes = [int(v) for v in rng.choice(10**6, size=n, replace=False)]
    updates = {v: rng.normal(0, 0.05, length) for v in nodes}
    updates[nodes[0]][:3] = [3.0, -2.0, 0.9]  # beyond the clipping range, and within it
    examples = {v: int(rng.integers(1, 5000)) for v in nodes}
    return updates, examples


def test_unmasked_sum_is_the_weighted_average_to_fixed_point_precision():
    updates, examples = make_updates(12, 500)
    masked, (weight, mean) = run_round(updates, examples)
    nodes = sorted(updates)
    assert weight == pytest.approx(sum(examples.values()) / MAX_WEIGHT, abs=12 * 2.0**-FRACTION_BITS)
    bound = 12 * 2.0 ** -(FRACTION_BITS + 1) / weight * 1.01 + 1e-12
    assert np.max(np.abs(mean - weighted_mean(updates, examples, nodes))) <= bound
    assert mean[0] != pytest.approx(weighted_mean({k: v * 0 for k, v in updates.items()}, examples, nodes)[0])


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
    assert weight == pytest.approx(sum(examples[n] for n in alive) / MAX_WEIGHT, abs=5 * 2.0**-FRACTION_BITS)
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
