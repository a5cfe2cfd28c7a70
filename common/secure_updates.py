"""Secure aggregation of model updates: fixed-point weighted updates, pairwise and self masks, and
recovery of sites lost after the masks were agreed (Bonawitz et al. 2017, every site a neighbour of
every other, as Flower's SecAggWorkflow). Pure math, no Flower and no IO: the ClientApp
(``client.federation.secure_updates``) and the server (``server.secure_updates``) share it.

A round with ``privacy.secure-updates``:

1. keys: each sampled site makes a fresh X25519 key pair and sends the public half.
2. shares: each site draws a self-mask seed ``b_i``, splits its private key and ``b_i`` into Shamir
   shares (threshold ``threshold(n)``, pycryptodome's GF(2^128) Shamir through Flower's
   ``create_shares``), and encrypts share j for site j (AES-GCM, key from the pair's X25519 secret
   with its own HKDF purpose). The server relays the ciphertexts; it cannot read them.
3. train: each site sends ``encode_update`` (weight and weighted clipped update in fixed point,
   mod 2^32) plus its pairwise masks (``common.secure_sum.mask_vector``) plus ``expand_mask(b_i)``.
4. unmask: the server names the survivors (their masked vectors arrived) and the dropped; every
   survivor reveals its share of ``b_i`` for each survivor and of the private key for each dropped
   site, never both for one site. With ``threshold(n)`` answers the server removes the self masks of
   the survivors and the pairwise masks the survivors shared with the dropped (``unmask_updates``),
   and divides the weighted sum by the summed weight (``decode_sum``).

Each masked vector alone is uniform on [0, 2^32)^length for the server: the self mask alone hides it
even from a server that later learns the dropped sites' keys.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from common.secure_sum import MODULUS, SecureSumError, expand_mask, mask_vector, pair_seed, public_key_of

#: Fixed point: values are scaled by 2^FRACTION_BITS (resolution 6e-8 of a weight-1 update).
FRACTION_BITS = 24
#: Each update coordinate (trained minus received weights) is clipped to +-CLIP before encoding.
CLIP = 1.0
#: A site's weight is min(examples, MAX_WEIGHT) / MAX_WEIGHT, so every weight is in [0, 1].
MAX_WEIGHT = 1 << 16
#: Sum of |weight * update| over sites must stay below 2^31 / 2^FRACTION_BITS: at most 127 sites.
MAX_SITES = (1 << (32 - 1 - FRACTION_BITS)) - 1
#: Fewer sites and the "sum" gives away too much: with 2, each site learns the other's update from
#: the mean it receives; with 1, the server learns the site's update.
MIN_SITES = 3
_SHARE_PURPOSE = b"share-encryption"
_SEED_BYTES = 32


def threshold(n_sites: int) -> int:
    """Shares needed to recover a secret: a strict majority (and 2 at least), so an honest-but-curious
    server never holds enough shares of a survivor's key and of its self-mask seed at once."""
    return max(2, n_sites // 2 + 1)


def check_sites(n_sites: int) -> None:
    if not MIN_SITES <= n_sites <= MAX_SITES:
        raise SecureSumError(f"secure updates need between {MIN_SITES} and {MAX_SITES} sites in a round, got {n_sites}")


def encode_update(update: np.ndarray, examples: int) -> np.ndarray:
    """``[w, w * clip(update)]`` in fixed point mod 2^32, with w = min(examples, MAX_WEIGHT) / MAX_WEIGHT.

    The weight travels inside the masked vector, so the server learns only the summed weight."""
    w = min(max(int(examples), 0), MAX_WEIGHT) / MAX_WEIGHT
    values = np.concatenate([[w], w * np.clip(np.asarray(update, np.float64).ravel(), -CLIP, CLIP)])
    return (np.rint(values * (1 << FRACTION_BITS)).astype(np.int64) % MODULUS).astype(np.uint64)


def decode_sum(total: Sequence[int] | np.ndarray) -> tuple[float, np.ndarray]:
    """(summed weight, weighted mean update) from the unmasked sum of ``encode_update`` vectors."""
    t = np.asarray(total, dtype=np.int64)
    signed = np.where(t >= MODULUS // 2, t - MODULUS, t).astype(np.float64) / (1 << FRACTION_BITS)
    weight = float(signed[0])
    if weight <= 0:
        raise SecureSumError("the summed weight is 0: no site trained")
    return weight, signed[1:] / weight


def flatten(state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Arrays in key order as one float64 vector, and the layout to rebuild them."""
    keys = sorted(state)
    layout = [(k, tuple(np.shape(state[k])), np.asarray(state[k]).dtype) for k in keys]
    vec = np.concatenate([np.asarray(state[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)
    return vec, layout


def unflatten(vec: np.ndarray, layout: list[tuple[str, tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for key, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        part = vec[at : at + size].reshape(shape)
        out[key] = (np.rint(part) if np.issubdtype(dtype, np.integer) else part).astype(dtype)
        at += size
    if at != vec.size:
        raise SecureSumError(f"the update has {vec.size} values, the model {at}")
    return out


# --- the site's secrets and shares ------------------------------------------------------------------


def new_self_seed() -> bytes:
    return os.urandom(_SEED_BYTES)


def _box(private: bytes, peers: Mapping[int, bytes], session: str, own: int, other: int) -> AESGCM:
    return AESGCM(pair_seed(private, peers[other], session, own, other, _SHARE_PURPOSE))


def _aad(session: str, sender: int, receiver: int) -> bytes:
    return f"{session}|{sender}->{receiver}".encode()


def make_shares(
    own: int, private: bytes, self_seed: bytes, peers: Mapping[int, bytes], session: str
) -> dict[int, bytes]:
    """Shamir shares of this site's private key and self-mask seed, one per site of the session
    (itself included), each encrypted for its receiver: ``{receiver node: nonce + ciphertext}``."""
    if peers.get(own) != public_key_of(private):
        raise SecureSumError("the peer list does not hold this site's public key for this session")
    nodes = sorted(int(n) for n in peers)
    check_sites(len(nodes))
    t = threshold(len(nodes))
    key_shares, seed_shares = create_shares(private, t, len(nodes)), create_shares(self_seed, t, len(nodes))
    out = {}
    for node, k_share, s_share in zip(nodes, key_shares, seed_shares):
        nonce = os.urandom(12)
        plain = struct.pack("<I", len(k_share)) + k_share + s_share
        out[node] = nonce + _box(private, peers, session, own, node).encrypt(nonce, plain, _aad(session, own, node))
    return out


def open_share(
    own: int, private: bytes, peers: Mapping[int, bytes], session: str, sender: int, box: bytes
) -> tuple[bytes, bytes]:
    """(share of ``sender``'s private key, share of its self-mask seed) held by this site."""
    plain = _box(private, peers, session, own, sender).decrypt(box[:12], box[12:], _aad(session, sender, own))
    n = struct.unpack("<I", plain[:4])[0]
    return plain[4 : 4 + n], plain[4 + n :]


def mask_update(
    encoded: np.ndarray, own: int, private: bytes, self_seed: bytes, peers: Mapping[int, bytes], session: str
) -> np.ndarray:
    """``encoded`` + pairwise masks with every peer + this site's self mask, mod 2^32."""
    check_sites(len(peers))
    paired = mask_vector(encoded, own, private, peers, session)
    return (paired + expand_mask(self_seed, paired.size)) % MODULUS


def reveal(
    own: int,
    private: bytes,
    peers: Mapping[int, bytes],
    session: str,
    boxes: Mapping[int, bytes],
    survivors: Sequence[int],
    dropped: Sequence[int],
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """This site's answer to the unmask step: its seed share of each survivor, its key share of each
    dropped site. A list naming a site both ways, or leaving out this site, is refused: that is how
    a server would get a survivor's key and seed together and strip its masks."""
    alive, gone = {int(n) for n in survivors}, {int(n) for n in dropped}
    if alive & gone or own not in alive or (alive | gone) != {int(n) for n in peers}:
        raise SecureSumError("the unmask request must split this session's sites into survivors and dropped")
    if len(alive) < threshold(len(peers)):
        raise SecureSumError(f"{len(alive)} survivors, {threshold(len(peers))} needed to unmask")
    seeds, keys = {}, {}
    for sender in alive | gone:
        key_share, seed_share = open_share(own, private, peers, session, sender, boxes[sender])
        if sender in alive:
            seeds[sender] = seed_share
        else:
            keys[sender] = key_share
    return seeds, keys


@dataclass(frozen=True)
class Reveal:
    """One survivor's unmask answer: shares of survivors' seeds and of dropped sites' keys."""

    seeds: Mapping[int, bytes]
    keys: Mapping[int, bytes]


def unmask_updates(
    masked: Mapping[int, np.ndarray], reveals: Sequence[Reveal], peers: Mapping[int, bytes], session: str
) -> np.ndarray:
    """The sum of the survivors' encoded updates: their masked vectors added, their self masks and
    the pairwise masks they shared with dropped sites removed. Needs ``threshold`` reveals."""
    nodes = sorted(int(n) for n in peers)
    t = threshold(len(nodes))
    if len(reveals) < t:
        raise SecureSumError(f"{len(reveals)} site(s) answered the unmask step, {t} needed")
    alive = sorted(int(n) for n in masked)
    dropped = [n for n in nodes if n not in masked]
    vectors = list(masked.values())
    total = np.zeros(np.asarray(vectors[0]).size, dtype=np.uint64)
    for v in vectors:
        total = (total + np.asarray(v, dtype=np.uint64)) % MODULUS
    for node in alive:
        seed = combine_shares([r.seeds[node] for r in reveals[:t]])
        total = (total + MODULUS - expand_mask(seed, total.size)) % MODULUS
    for gone in dropped:
        key = combine_shares([r.keys[gone] for r in reveals[:t]])
        if public_key_of(key) != peers[gone]:
            raise SecureSumError(f"the shares of node {gone}'s key do not rebuild its public key")
        for node in alive:
            m = expand_mask(pair_seed(key, peers[node], session, gone, node), total.size)
            # node added +m for a peer above it and -m for one below (mask_vector): take it back out
            total = (total + MODULUS - m) % MODULUS if gone > node else (total + m) % MODULUS
    return total.astype(np.int64)
