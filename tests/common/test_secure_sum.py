"""The pairwise-masking secure sum (common.secure_sum): exact totals, masked vectors that look like noise."""

from __future__ import annotations

import numpy as np
import pytest

from common.secure_sum import (
    MODULUS,
    SecureSumError,
    expand_mask,
    generate_key_pair,
    mask_vector,
    pair_seed,
    public_key_of,
    unmask_sum,
)

#: Flower node ids are random 64-bit integers in deployment.
NODES = (3, 17, 2**63 + 5, 2**64 - 1, 1_000_000_007)


def session_of(nodes, session="counts-3-1"):
    keys = {n: generate_key_pair() for n in nodes}
    return keys, {n: pub for n, (_, pub) in keys.items()}


def masked_all(values: dict, session="counts-3-1"):
    keys, peers = session_of(values, session)
    return {n: mask_vector(values[n], n, keys[n][0], peers, session) for n in values}


def test_sum_of_masked_vectors_is_the_plain_sum():
    rng = np.random.default_rng(0)
    values = {n: rng.integers(0, 5000, size=9).tolist() for n in NODES}
    values[NODES[0]][0] = MODULUS - 1  # the largest value allowed
    masked = masked_all(values)
    expected = [sum(v[i] for v in values.values()) % MODULUS for i in range(9)]  # plain Python ints
    assert unmask_sum(masked.values()).tolist() == expected


def test_pair_seed_is_symmetric_and_bound_to_session_and_pair():
    (a_priv, a_pub), (b_priv, b_pub), (_, c_pub) = generate_key_pair(), generate_key_pair(), generate_key_pair()
    seed = pair_seed(a_priv, b_pub, "s", 1, 2)
    assert seed == pair_seed(b_priv, a_pub, "s", 2, 1) and len(seed) == 32
    assert seed != pair_seed(a_priv, b_pub, "t", 1, 2)  # another session
    assert seed != pair_seed(a_priv, b_pub, "s", 1, 3)  # another pair of node ids
    assert seed != pair_seed(a_priv, c_pub, "s", 1, 2)  # another peer key
    assert public_key_of(a_priv) == a_pub


def test_a_masked_vector_looks_uniform():
    """One site's masked vector alone: nothing like its counts, spread evenly over [0, 2^32)."""
    counts = [0] * 2000 + [7] * 2000
    values = {1: counts, 2: [1] * 4000, 3: [2] * 4000}
    masked = masked_all(values)[1]
    assert not np.any(masked == np.asarray(counts))
    assert abs(masked.mean() / MODULUS - 0.5) < 0.02  # uniform mean 1/2, sd 0.0046 here
    hist, _ = np.histogram(masked, bins=16, range=(0, MODULUS))
    chi2 = ((hist - 250) ** 2 / 250).sum()
    assert chi2 < 45  # 15 dof: P(chi2 > 45) ~ 1e-4
    # zeros and sevens are masked alike: no visible difference between the halves
    assert abs(masked[:2000].mean() - masked[2000:].mean()) / MODULUS < 0.05
    # the same counts masked in another session share nothing
    again = masked_all(values, session="counts-3-2")[1]
    assert not np.any(again == masked)


def test_masks_do_not_cancel_without_every_site():
    values = {1: [5, 5], 2: [1, 2], 3: [0, 4]}
    masked = masked_all(values)
    partial = unmask_sum([masked[1], masked[2]]).tolist()
    assert partial != [6, 7]


def test_expand_mask_is_deterministic_and_32_bit():
    m = expand_mask(b"\x01" * 32, 1000)
    assert m.dtype == np.uint64 and m.shape == (1000,) and m.max() < MODULUS
    assert np.array_equal(m, expand_mask(b"\x01" * 32, 1000))
    assert np.array_equal(expand_mask(b"\x01" * 32, 10), m[:10])


def test_refusals():
    keys, peers = session_of((1, 2))
    with pytest.raises(SecureSumError, match="at least one other site"):
        mask_vector([1, 2], 1, keys[1][0], {1: peers[1]}, "s")
    with pytest.raises(SecureSumError, match="does not hold this site's public key"):
        mask_vector([1, 2], 1, keys[1][0], {1: peers[2], 2: peers[2]}, "s")
    with pytest.raises(SecureSumError, match="does not hold this site's public key"):
        mask_vector([1, 2], 3, keys[1][0], peers, "s")  # listed under another node id
    for bad in ([-1, 2], [MODULUS, 0], [[1, 2]], [0.5]):
        with pytest.raises(SecureSumError):
            mask_vector(bad, 1, keys[1][0], peers, "s")
    with pytest.raises(SecureSumError, match="differ in length"):
        unmask_sum([[1, 2], [1]])
    with pytest.raises(SecureSumError, match="raw bytes"):
        pair_seed(keys[1][0], b"short", "s", 1, 2)
