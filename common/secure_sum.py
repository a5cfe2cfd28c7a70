"""Secure summation by pairwise masking (Bonawitz et al. 2017, without the dropout recovery).

Every site holds a vector of non-negative integers (its label counts); the server must learn the
element-wise sum over the sites and nothing else. The math here is pure (no Flower, no IO), so the
ClientApp (``mask_vector``) and the ServerApp (``unmask_sum``) share it, and tests can check it alone.

1. Each site makes a fresh X25519 key pair (``generate_key_pair``) and sends the public half.
2. The server sends every site the list ``node id -> public key`` of all sites in the session.
3. Site ``i`` derives with every peer ``j`` the same 32-byte seed (X25519, then HKDF-SHA256 bound
   to the session and the pair, ``pair_seed``), expands it into a mask of ``length`` integers mod
   2^32 (SHAKE-256, ``expand_mask``), adds it for every peer ``j > i``, subtracts it for ``j < i``,
   and sends only the masked vector.
4. The server adds the masked vectors mod 2^32: every pairwise mask appears once with + and once
   with - and cancels, leaving the exact sum (``unmask_sum``), provided every site that took part
   in step 2 replied in step 3. If one did not, its masks do not cancel and the result is noise:
   the server starts again with the sites still present.

Each masked vector on its own is uniform on [0, 2^32)^length for anyone without the site's private
key or its peers' (the sum of at least one unknown uniform mask). The result is exact while every
true total is below ``MODULUS`` (2^32, about 4.3e9 slices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Arithmetic is modulo 2^32; masked values travel as ints in [0, 2^32) (a MetricRecord int list).
MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS
_DTYPE = np.dtype("<u4")
#: Raw X25519 keys are 32 bytes.
KEY_BYTES = 32
#: Domain separation for the HKDF: a seed made for this protocol is never valid for another.
_INFO = b"hemexp/secure-sum/v1"


class SecureSumError(ValueError):
    """The protocol cannot go on as asked (bad peer list, bad key, value out of range)."""


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``; use it for one session only."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return private, public_key_of(private)


def public_key_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def pair_seed(
    private: bytes, peer_public: bytes, session: str, node_a: int, node_b: int, purpose: bytes = b""
) -> bytes:
    """The 32-byte seed sites ``node_a`` and ``node_b`` share in ``session`` (symmetric in a, b).

    X25519 gives both sides the same secret; HKDF-SHA256 turns it into a uniform key bound to the
    session and to the (ordered) pair, so no seed is ever reused across sessions or pairs.
    ``purpose`` separates keys made from the same pair for other uses (the mask seed has none).
    """
    if len(peer_public) != KEY_BYTES:
        raise SecureSumError(f"a public key must be {KEY_BYTES} raw bytes, got {len(peer_public)}")
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((int(node_a), int(node_b)))
    info = b"|".join([_INFO, session.encode(), str(lo).encode(), str(hi).encode(), *([purpose] if purpose else [])])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` integers mod 2^32 from a 32-byte seed (SHAKE-256 as the pseudo-random generator).

    Flower's SecAgg+ seeds NumPy's Mersenne Twister with 32 bits folded from the key
    (``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen``); an extendable-output
    hash keeps the seed's full 256 bits.
    """
    return np.frombuffer(hashlib.shake_256(seed).digest(length * _DTYPE.itemsize), dtype=_DTYPE).astype(np.uint64)


def check_values(values: Sequence[int]) -> np.ndarray:
    """``values`` as uint64, refusing anything outside [0, 2^32)."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise SecureSumError("secure summation takes a flat vector of integers")
    if arr.size and (arr.min() < 0 or arr.max() >= MODULUS):
        raise SecureSumError(f"values must lie in [0, 2^{MODULUS_BITS})")
    return arr.astype(np.uint64)


def mask_vector(
    values: Sequence[int], own_node: int, private: bytes, peers: Mapping[int, bytes], session: str
) -> np.ndarray:
    """This site's masked vector: ``values + sum_{j > own} m_j - sum_{j < own} m_j`` mod 2^32.

    ``peers`` maps every node id of the session to its public key, this site included: its own
    entry must be its own public key (a list meant for another session or another node is
    refused), and there must be at least one other site (alone, the "sum" is the site's values).
    """
    vec = check_values(values)
    if peers.get(own_node) != public_key_of(private):
        raise SecureSumError("the peer list does not hold this site's public key for this session")
    others = {int(n): bytes(k) for n, k in peers.items() if int(n) != int(own_node)}
    if not others:
        raise SecureSumError("secure summation needs at least one other site; refusing to send the values")
    out = vec.copy()
    for node, public in others.items():
        mask = expand_mask(pair_seed(private, public, session, own_node, node), vec.size)
        out = out + mask if node > own_node else out + (MODULUS - mask)
    return out % MODULUS


def unmask_sum(masked: Iterable[Sequence[int]]) -> np.ndarray:
    """The element-wise sum mod 2^32 of every masked vector of a session, as int64.

    Exact only when the vectors come from every site of the peer list (else the masks of the
    missing ones remain); the caller checks that before.
    """
    vectors = [check_values(v) for v in masked]
    if not vectors:
        raise SecureSumError("nothing to sum")
    if len({v.size for v in vectors}) != 1:
        raise SecureSumError("masked vectors differ in length")
    total = np.zeros(vectors[0].size, dtype=np.uint64)
    for v in vectors:
        total = (total + v) % MODULUS
    return total.astype(np.int64)
