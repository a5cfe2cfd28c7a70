"""The counts round under ``privacy.secure-counts``: the server learns the summed label counts only.

Two exchanges of query messages (the math: ``common.secure_sum``; the site's side:
``client.client_app.count_labels``):

1. "keys": every connected site answers with a fresh X25519 public key;
2. "mask": every site that answered gets the list (node id, public key) of the session and answers
   with its counts vector (``common.records.pack_counts``: positives, negatives, training slices)
   masked by its pairwise masks with every other site of the list.

The masked vectors add up (mod 2^32) to the exact totals only when every site of the list
answered step 2. A site lost between the steps leaves its peers' masks in the sum, and the
protocol starts again (new session, new keys) with the sites still present, at most
``MAX_ATTEMPTS`` times. Honest-but-curious server; no dropout recovery (docs/secure-aggregation.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from common.records import (
    CONFIG,
    MASKED_COUNTS,
    METRICS,
    PUBLIC_KEY,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
    pack_peers,
    unpack_counts,
)
from common.secure_sum import KEY_BYTES, MODULUS, unmask_sum

#: Sessions tried before the round goes on without its secure sum (each one after a site dropped; counts, validation).
MAX_ATTEMPTS = 3
#: A "sum" over a single site is that site's counts: never run the protocol with fewer.
MIN_SITES = 2

#: ``exchange(phase, messages) -> good replies`` (the server's send/wait/log-failures step).
Exchange = Callable[[str, list[Message]], list[Message]]


def secure_label_counts(
    node_ids: Iterable[int],
    exchange: Exchange,
    server_round: int,
    n_labels: int,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    site_name: Callable[[int], str] = str,
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Summed (positives, negatives, training slices) of the sites in ``node_ids``, or None when
    fewer than ``MIN_SITES`` take part or every attempt lost a site between the two steps."""
    nodes = sorted({int(n) for n in node_ids})
    length = 2 * n_labels + 1
    for attempt in range(1, max_attempts + 1):
        session = f"counts-{server_round}-{attempt}"
        if len(nodes) < MIN_SITES:
            log(
                WARNING,
                "secure counts: %d site(s) available, %d needed (a sum over one site is its own counts); "
                "stage 2 runs without the global pos-weight",
                len(nodes),
                MIN_SITES,
            )
            return None
        replies = exchange(
            "secure counts: keys", [_query(n, server_round, session, attempt, SECURE_KEYS) for n in nodes]
        )
        keys = public_keys(replies)
        for r in replies:
            if int(r.metadata.src_node_id) not in keys:
                log(WARNING, "secure counts: %s sent no valid public key; left out", site_name(r.metadata.src_node_id))
        if len(keys) < MIN_SITES:
            log(
                WARNING,
                "secure counts: %d site(s) sent a key, %d needed; stage 2 runs without the global pos-weight",
                len(keys),
                MIN_SITES,
            )
            return None
        peers = sorted(keys)
        replies = exchange(
            "secure counts: masked counts",
            [
                _query(n, server_round, session, attempt, SECURE_MASK, peers=[(p, keys[p]) for p in peers])
                for n in peers
            ],
        )
        masked = {}
        for r in replies:
            vector = r.content[METRICS].get(MASKED_COUNTS)
            if isinstance(vector, list) and len(vector) == length and all(0 <= int(v) < MODULUS for v in vector):
                masked[r.metadata.src_node_id] = vector
            else:
                log(
                    WARNING,
                    "secure counts: %s sent a malformed masked vector; treated as lost",
                    site_name(r.metadata.src_node_id),
                )
        lost = [n for n in peers if n not in masked]
        if not lost:
            pos, neg, slices = unpack_counts(unmask_sum(masked.values()), n_labels)
            log(INFO, "secure counts: %d site(s) summed in session %s (no site's own counts seen)", len(peers), session)
            return pos, neg, slices
        nodes = sorted(masked)
        log(
            WARNING,
            "secure counts: %s answered the key exchange but sent no masked counts; their pairwise masks "
            "do not cancel, so this sum is unusable. %s with the %d site(s) still present (attempt %d of %d)",
            ", ".join(site_name(n) for n in lost),
            "Restarting" if attempt < max_attempts else "Not restarting",
            len(nodes),
            attempt,
            max_attempts,
        )
    log(
        WARNING,
        "secure counts: sites kept dropping out in %d attempts; stage 2 runs without the global pos-weight",
        max_attempts,
    )
    return None


def public_keys(replies: list[Message]) -> dict[int, bytes]:
    """node id -> public key of the replies holding a well-formed one (the keys step of every secure sum:
    counts, updates, validation)."""
    keys = {}
    for r in replies:
        public = r.content[SECURE].get(PUBLIC_KEY) if SECURE in r.content else None
        if isinstance(public, bytes) and len(public) == KEY_BYTES:
            keys[int(r.metadata.src_node_id)] = public
    return keys


def session_message(
    node: int,
    server_round: int,
    session: str,
    phase: str,
    peers: list[tuple[int, bytes]] | None,
    message_type: str,
    group_id: str,
) -> Message:
    """One step of a pairwise-mask secure sum (keys, then masking) for ``node``: the round, the phase and the
    session in its config, the peers' public keys with the masking step. Secure counts send it as a query,
    secure validation as an evaluate message (``server.secure_validation``)."""
    content = RecordDict(
        {CONFIG: ConfigRecord({SERVER_ROUND: server_round, SECURE_PHASE: phase, SECURE_SESSION: session})}
    )
    if peers is not None:
        content[SECURE] = ConfigRecord(pack_peers(dict(peers)))
    return Message(content, dst_node_id=node, message_type=message_type, group_id=group_id)


def _query(
    node: int, server_round: int, session: str, attempt: int, phase: str, peers: list[tuple[int, bytes]] | None = None
) -> Message:
    return session_message(
        node, server_round, session, phase, peers, MessageType.QUERY, f"{server_round}-counts-{attempt}"
    )
