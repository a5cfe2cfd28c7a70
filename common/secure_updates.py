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
3. train: each site sends ``encode_update`` (weight and weighted update in fixed point, in two rings:
   ``Rings``) plus its pairwise masks plus its self mask ``expand_mask(b_i)`` (``mask_update``).
4. unmask: the server names the survivors (their masked vectors arrived) and the dropped; every
   survivor reveals its share of ``b_i`` for each survivor and of the private key for each dropped
   site, never both for one site. With ``threshold(n)`` answers the server removes the self masks of
   the survivors and the pairwise masks the survivors shared with the dropped (``unmask_updates``),
   and divides the weighted sum by the summed weight (``decode_sum``).

Each masked vector alone is uniform on [0, 2^32)^words for the server: the self mask alone hides it
even from a server that later learns the dropped sites' keys.

No value is clipped. Learnable weights travel mod 2^32 in a public range of +-``RANGE`` (AdamW moves a
weight by about lr = 1e-3 a step); BatchNorm's running statistics and integer counters are not
gradient steps (a running variance moved by up to 3.55 in 16 steps of the tiny model, the step counter
by the number of steps), so they travel mod 2^64 in +-``WIDE_RANGE``. A value beyond its range is an
error at the site, which then drops out of the round (recovered from the shares), never a silent clip.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from common.secure_sum import MODULUS, SecureSumError, expand_mask, pair_seed, public_key_of

#: The narrow ring (learnable weights): mod 2^32, values scaled by 2^FRACTION_BITS (6e-8 of a weight-1 update).
FRACTION_BITS = 24
#: Public bound on a learnable weight's move in one round (trained minus received); beyond it the site
#: refuses to send (``SecureSumError``), it never clips.
RANGE = 1.0
#: The wide ring (BatchNorm running statistics, integer counters, and the site's weight): mod 2^64,
#: values scaled by 2^WIDE_FRACTION_BITS (2.3e-10 of a weight-1 update).
WIDE_MODULUS = 1 << 64
WIDE_FRACTION_BITS = 32
#: Public bound on a running statistic's or a counter's move in one round (about 1e6).
WIDE_RANGE = float(1 << 20)
#: Names of the state-dict entries that travel in the wide ring (besides every integer tensor).
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
#: A site's weight is min(examples, MAX_WEIGHT) / MAX_WEIGHT, so every weight is in [0, 1] and has 16
#: fraction bits: exact in the wide ring, so the summed weight is exact.
MAX_WEIGHT = 1 << 16
#: Sums of |weight * value| over the sites stay below half of each ring: n * RANGE * 2^24 < 2^31 and
#: n * WIDE_RANGE * 2^32 < 2^63, so at most 127 sites (the narrow ring binds).
MAX_SITES = min(
    (1 << (32 - 1 - FRACTION_BITS)) // int(RANGE) - 1,
    (1 << (64 - 1 - WIDE_FRACTION_BITS)) // int(WIDE_RANGE) - 1,
)
#: Fewer sites and the "sum" gives away too much: with 2, each site learns the other's update from
#: the mean it receives; with 1, the server learns the site's update.
MIN_SITES = 3
_SHARE_PURPOSE = b"share-encryption"
#: (key, shape, dtype) of every array of a half, in key order.
Layout = list[tuple[str, tuple[int, ...], np.dtype]]
_SEED_BYTES = 32


def threshold(n_sites: int) -> int:
    """Shares needed to recover a secret: a strict majority (and 2 at least), so an honest-but-curious
    server never holds enough shares of a survivor's key and of its self-mask seed at once."""
    return max(2, n_sites // 2 + 1)


def check_sites(n_sites: int) -> None:
    if not MIN_SITES <= n_sites <= MAX_SITES:
        raise SecureSumError(f"secure updates need between {MIN_SITES} and {MAX_SITES} sites in a round, got {n_sites}")


def is_statistic(key: str, dtype: np.dtype) -> bool:
    """Whether an entry travels in the wide ring: a running statistic or an integer counter (public:
    both sides decide from the key and the dtype of the half the server sent)."""
    return key.rsplit(".", 1)[-1] in STATISTICS or not np.issubdtype(np.dtype(dtype), np.floating)


def value_range(key: str, dtype: np.dtype) -> float:
    """The public bound on how far one value of ``key`` may move in a round."""
    return WIDE_RANGE if is_statistic(key, dtype) else RANGE


@dataclass(frozen=True, eq=False)
class Rings:
    """Which values of a flat update travel in which ring; the wire vector (uint32 words) is the
    narrow values, then the site's weight and the wide values, two words (low, high) each."""

    wide: np.ndarray  # bool, one per flat value

    @classmethod
    def of(cls, layout: Layout) -> Rings:
        """The rings of a half with this layout (``flatten``)."""
        flags = [np.full(int(np.prod(shape, dtype=np.int64)), is_statistic(k, d)) for k, shape, d in layout]
        return cls(np.concatenate(flags) if flags else np.zeros(0, bool))

    @classmethod
    def narrow_only(cls, length: int) -> Rings:
        return cls(np.zeros(length, bool))

    @property
    def narrow(self) -> int:
        """Words in the narrow ring (mod 2^32), at the start of the wire vector."""
        return int(self.wide.size - np.count_nonzero(self.wide))

    @property
    def words(self) -> int:
        """Length of the wire vector."""
        return self.narrow + 2 * (1 + int(np.count_nonzero(self.wide)))


def _join(words: np.ndarray) -> np.ndarray:
    """uint32 words (low, high, low, ...) as uint64 values."""
    w = np.asarray(words, np.uint64)
    return w[0::2] | (w[1::2] << np.uint64(32))


def _split(values: np.ndarray) -> np.ndarray:
    """uint64 values as uint32 words (low, high, ...), held in uint64."""
    v = np.asarray(values, np.uint64)
    out = np.empty(2 * v.size, np.uint64)
    out[0::2], out[1::2] = v & np.uint64(0xFFFFFFFF), v >> np.uint64(32)
    return out


def ring_add(a: np.ndarray, b: np.ndarray, narrow: int, subtract: bool = False) -> np.ndarray:
    """``a +- b`` of two wire vectors: the first ``narrow`` words mod 2^32, the rest as uint64 mod 2^64."""
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    an, bn = a[:narrow], b[:narrow]
    low = (an + (MODULUS - bn if subtract else bn)) % MODULUS
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps: that is the ring mod 2^64
        wide = _join(a[narrow:]) - _join(b[narrow:]) if subtract else _join(a[narrow:]) + _join(b[narrow:])
    return np.concatenate([low, _split(wide)])


def encode_update(update: np.ndarray, examples: int, rings: Rings | None = None) -> np.ndarray:
    """The wire vector of ``[w, w * update]`` in fixed point, w = min(examples, MAX_WEIGHT) / MAX_WEIGHT:
    narrow values mod 2^32 (2^-24 steps), the weight and wide values mod 2^64 (2^-32 steps).

    The weight travels inside the masked vector, so the server learns only the summed weight. A value
    beyond its ring's public range is refused (``SecureSumError``): clipping it would change the mean."""
    values = np.asarray(update, np.float64).ravel()
    rings = rings or Rings.narrow_only(values.size)
    if rings.wide.size != values.size:
        raise SecureSumError(f"the update has {values.size} values, the rings {rings.wide.size}")
    bound = np.where(rings.wide, WIDE_RANGE, RANGE)
    if not np.all(np.abs(values) <= bound):
        worst = int(np.argmax(np.abs(values) - bound))
        raise SecureSumError(
            f"update value {values[worst]:.4g} at {worst} is beyond its public range +-{bound[worst]:g}"
        )
    w = min(max(int(examples), 0), MAX_WEIGHT) / MAX_WEIGHT
    narrow = np.rint(w * values[~rings.wide] * (1 << FRACTION_BITS)).astype(np.int64) % MODULUS
    wide = np.rint(np.concatenate([[w], w * values[rings.wide]]) * 2.0**WIDE_FRACTION_BITS).astype(np.int64)
    return np.concatenate([narrow.astype(np.uint64), _split(wide.view(np.uint64))])


def decode_sum(total: Sequence[int] | np.ndarray, rings: Rings | None = None) -> tuple[float, np.ndarray]:
    """(summed weight, weighted mean update in flat order) from the unmasked sum of wire vectors."""
    t = np.asarray(total, np.uint64)
    rings = rings or Rings.narrow_only(t.size - 2)
    if t.size != rings.words:
        raise SecureSumError(f"the sum has {t.size} words, the rings {rings.words}")
    low = t[: rings.narrow].astype(np.int64)
    low = np.where(low >= MODULUS // 2, low - MODULUS, low).astype(np.float64) / (1 << FRACTION_BITS)
    wide = _join(t[rings.narrow :]).view(np.int64).astype(np.float64) / 2.0**WIDE_FRACTION_BITS
    weight = float(wide[0])
    if weight <= 0:
        raise SecureSumError("the summed weight is 0: no site trained")
    mean = np.empty(rings.wide.size, np.float64)
    mean[~rings.wide], mean[rings.wide] = low, wide[1:]
    return weight, mean / weight


def layout_of(state: Mapping[str, np.ndarray]) -> Layout:
    """Key, shape and dtype of every array, in key order (the order ``flatten`` lays them out)."""
    return [(k, tuple(np.shape(state[k])), np.asarray(state[k]).dtype) for k in sorted(state)]


def flatten(state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Arrays in key order as one float64 vector, and the layout to rebuild them."""
    layout = layout_of(state)
    vec = np.concatenate([np.asarray(state[k], np.float64).ravel() for k, _, _ in layout]) if layout else np.zeros(0)
    return vec, layout


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
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
    encoded: np.ndarray,
    own: int,
    private: bytes,
    self_seed: bytes,
    peers: Mapping[int, bytes],
    session: str,
    narrow: int | None = None,
) -> np.ndarray:
    """``encoded`` + the pairwise mask of every peer above this site - of every peer below + this
    site's self mask, each ring in its own modulus (``narrow``: words mod 2^32; default all but the
    last two, the weight). The masks are SHAKE-256 streams of uint32 words (``expand_mask``); two
    consecutive words make one mask value of the wide ring."""
    check_sites(len(peers))
    if peers.get(own) != public_key_of(private):
        raise SecureSumError("the peer list does not hold this site's public key for this session")
    out = np.asarray(encoded, np.uint64)
    narrow = out.size - 2 if narrow is None else narrow
    for node, public in peers.items():
        if int(node) != int(own):
            mask = expand_mask(pair_seed(private, bytes(public), session, own, int(node)), out.size)
            out = ring_add(out, mask, narrow, subtract=int(node) < int(own))
    return ring_add(out, expand_mask(self_seed, out.size), narrow)


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
    masked: Mapping[int, np.ndarray],
    reveals: Sequence[Reveal],
    peers: Mapping[int, bytes],
    session: str,
    narrow: int | None = None,
) -> np.ndarray:
    """The sum of the survivors' wire vectors: their masked vectors added, their self masks and the
    pairwise masks they shared with dropped sites removed (``narrow`` as in ``mask_update``). Needs
    ``threshold`` reveals."""
    nodes = sorted(int(n) for n in peers)
    t = threshold(len(nodes))
    if len(reveals) < t:
        raise SecureSumError(f"{len(reveals)} site(s) answered the unmask step, {t} needed")
    alive = sorted(int(n) for n in masked)
    dropped = [n for n in nodes if n not in masked]
    vectors = list(masked.values())
    total = np.zeros(np.asarray(vectors[0]).size, dtype=np.uint64)
    narrow = total.size - 2 if narrow is None else narrow
    for v in vectors:
        total = ring_add(total, v, narrow)
    for node in alive:
        seed = combine_shares([r.seeds[node] for r in reveals[:t]])
        total = ring_add(total, expand_mask(seed, total.size), narrow, subtract=True)
    for gone in dropped:
        key = combine_shares([r.keys[gone] for r in reveals[:t]])
        if public_key_of(key) != peers[gone]:
            raise SecureSumError(f"the shares of node {gone}'s key do not rebuild its public key")
        for node in alive:
            m = expand_mask(pair_seed(key, peers[node], session, gone, node), total.size)
            # node added +m for a peer above it and -m for one below (mask_update): take it back out
            total = ring_add(total, m, narrow, subtract=gone > node)
    return total
