"""A train round under ``privacy.secure-updates``: the server learns only the weighted mean update.

Around the round's train messages (the math: ``common.secure_updates``; the site's side:
``client.federation.secure_updates``):

1. "update-keys": every site sampled for the round answers with a fresh X25519 public key;
2. "update-shares": each gets the session's (node, key) list and answers with its encrypted Shamir
   shares, one per site; a site lost here never masked anything, so the session restarts without it
   (at most ``MAX_ATTEMPTS``);
3. train: each train message carries the session's peers and the shares addressed to its site; the
   reply holds the masked update only;
4. "update-unmask": the survivors (masked update received) reveal the survivors' seed shares and the
   dropped sites' key shares; with ``threshold(n)`` answers the server removes every mask.

The mean update is added to the global half and handed to the strategy as a single reply weighted by
the summed weight, so FedAvg/FedProx/FedBN take it as it is and FedAdam/FedYogi step from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from common.records import (
    ARRAYS,
    CONFIG,
    DROPPED,
    KEY_NODES,
    KEY_SHARES,
    MASKED_UPDATE,
    METRICS,
    NUM_EXAMPLES,
    SECURE,
    SECURE_PHASE,
    SECURE_SESSION,
    SEED_NODES,
    SEED_SHARES,
    SERVER_ROUND,
    SHARE_DATA,
    SHARE_NODES,
    SURVIVORS,
    UPDATE_KEYS,
    UPDATE_SHARES,
    UPDATE_UNMASK,
    pack_peers,
)
from common.secure_sum import SecureSumError
from common.secure_updates import (
    MIN_SITES,
    Reveal,
    Rings,
    decode_sum,
    flatten,
    threshold,
    unflatten,
    unmask_updates,
)
from server.secure_counts import public_keys

#: Sessions tried when a site is lost before it masked anything (after that, shares recover it).
MAX_ATTEMPTS = 3

#: ``exchange(phase, messages) -> good replies`` (the server's send/wait/log-failures step).
Exchange = Callable[[str, list[Message]], list[Message]]


@dataclass
class SecureRound:
    """What a secure train round gives the server: the train replies (metrics only, for the history)
    and one reply carrying the aggregate, or None when the round could not be unmasked."""

    replies: list[Message]
    aggregate: Message | None


def secure_train(
    messages: list[Message],
    exchange: Exchange,
    server_round: int,
    global_half: Mapping[str, np.ndarray],
    site_name: Callable[[int], str] = str,
) -> SecureRound:
    """Run steps 1-4 for the round's train ``messages``; ``global_half``: the arrays they carry."""
    by_node = {int(m.metadata.dst_node_id): m for m in messages}
    vec, layout = flatten(global_half)
    nodes = sorted(by_node)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        session = f"updates-{server_round}-{attempt}"
        if len(nodes) < MIN_SITES:
            log(WARNING, "secure updates: %d site(s), %d needed; the global model stays", len(nodes), MIN_SITES)
            return SecureRound([], None)
        keys = public_keys(
            exchange("secure updates: keys", [_query(n, server_round, session, UPDATE_KEYS) for n in nodes])
        )
        peers = {n: keys[n] for n in sorted(keys)}
        if len(peers) < MIN_SITES:
            nodes = sorted(peers)
            continue
        secure = ConfigRecord(pack_peers(peers))
        shares = exchange(
            "secure updates: shares",
            [_query(n, server_round, session, UPDATE_SHARES, secure) for n in peers],
        )
        boxes = {int(r.metadata.src_node_id): _boxes(r, peers) for r in shares}
        boxes = {n: b for n, b in boxes.items() if b is not None}
        if set(boxes) != set(peers):
            lost = sorted(set(peers) - set(boxes))
            log(
                WARNING,
                "secure updates: %s sent no shares; restarting the session without them (attempt %d of %d)",
                ", ".join(site_name(n) for n in lost),
                attempt,
                MAX_ATTEMPTS,
            )
            nodes = sorted(boxes)
            continue
        return _train_and_unmask(by_node, peers, boxes, exchange, server_round, session, vec, layout, site_name)
    log(
        WARNING,
        "secure updates: sites kept dropping before masking in %d attempts; the global model stays",
        MAX_ATTEMPTS,
    )
    return SecureRound([], None)


def _train_and_unmask(by_node, peers, boxes, exchange, server_round, session, vec, layout, site_name) -> SecureRound:
    train = []
    for n in peers:
        sec = ConfigRecord(
            {
                SECURE_SESSION: session,
                **pack_peers(peers),
                SHARE_NODES: list(boxes),
                SHARE_DATA: [boxes[sender][n] for sender in boxes],
            }
        )
        m = by_node[n]
        content = RecordDict({**dict(m.content.items()), SECURE: sec})
        train.append(
            Message(content, dst_node_id=n, message_type=m.metadata.message_type, group_id=m.metadata.group_id)
        )
    replies = exchange("train", train)
    rings = Rings.of(layout)  # public: both sides derive it from the half's keys and dtypes
    masked = {}
    for r in replies:
        arr = r.content[ARRAYS].get(MASKED_UPDATE) if ARRAYS in r.content else None
        values = None if arr is None else np.asarray(arr.numpy()).ravel()
        if values is not None and values.size == rings.words and values.dtype == np.uint32:
            masked[int(r.metadata.src_node_id)] = values.astype(np.uint64)
        else:
            log(
                WARNING,
                "secure updates: %s sent a malformed masked update; treated as dropped",
                site_name(r.metadata.src_node_id),
            )
    alive, dropped = sorted(masked), sorted(set(peers) - set(masked))
    t = threshold(len(peers))
    if dropped:
        log(
            INFO,
            "secure updates: %s dropped after masking; recovering their masks from shares",
            ", ".join(site_name(n) for n in dropped),
        )
    if len(alive) < t:
        log(
            WARNING,
            "secure updates: %d of %d sites sent an update, %d needed to unmask; the global model stays",
            len(alive),
            len(peers),
            t,
        )
        return SecureRound(replies, None)
    lists = ConfigRecord({SURVIVORS: alive, DROPPED: dropped})
    answers = exchange(
        "secure updates: unmask", [_query(n, server_round, session, UPDATE_UNMASK, lists) for n in alive]
    )
    reveals = [rv for rv in (_reveal(a, alive, dropped) for a in answers) if rv is not None]
    try:
        weight, mean = decode_sum(unmask_updates(masked, reveals, peers, session, rings.narrow), rings)
    except SecureSumError as exc:
        log(WARNING, "secure updates: cannot unmask round %d (%s); the global model stays", server_round, exc)
        return SecureRound(replies, None)
    log(INFO, "secure updates: %d site(s) aggregated in session %s (no site's own update seen)", len(alive), session)
    state = unflatten(vec + mean, layout)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(v) for k, v in state.items()}),
            METRICS: MetricRecord({NUM_EXAMPLES: float(weight)}),
        }
    )
    return SecureRound(replies, Message(content, reply_to=train[0]))


def _boxes(reply: Message, peers: Mapping[int, bytes]) -> dict[int, bytes] | None:
    sec = reply.content[SECURE] if SECURE in reply.content else None
    if sec is None or SHARE_NODES not in sec:
        return None
    boxes = dict(zip((int(n) for n in sec[SHARE_NODES]), (bytes(b) for b in sec[SHARE_DATA])))
    return boxes if set(boxes) == set(peers) else None


def _reveal(reply: Message, alive: list[int], dropped: list[int]) -> Reveal | None:
    sec = reply.content[SECURE] if SECURE in reply.content else None
    if sec is None:
        return None
    seeds = dict(zip((int(n) for n in sec[SEED_NODES]), (bytes(b) for b in sec[SEED_SHARES])))
    keys = dict(zip((int(n) for n in sec[KEY_NODES]), (bytes(b) for b in sec[KEY_SHARES])))
    return Reveal(seeds, keys) if set(seeds) == set(alive) and set(keys) == set(dropped) else None


def _query(node: int, server_round: int, session: str, phase: str, secure: ConfigRecord | None = None) -> Message:
    content = RecordDict(
        {CONFIG: ConfigRecord({SERVER_ROUND: server_round, SECURE_PHASE: phase, SECURE_SESSION: session})}
    )
    if secure is not None:
        content[SECURE] = secure
    return Message(content, dst_node_id=node, message_type=MessageType.QUERY, group_id=f"{server_round}-{phase}")
