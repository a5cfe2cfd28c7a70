"""The validation sums of a round that can be chosen, summed securely: the server never sees one site's.

Always on (``common.secure_validation``; the site's side: ``client.federation.secure_validation``). The
round's evaluate message names the session ``validation-R-1`` and each site's reply carries its public
key, so the key exchange costs no extra round trip; then:

1. "validation-mask": every site whose evaluate reply passed gets the session's (node id, public key)
   list and answers with its packed validation sums masked by its pairwise masks (one uint32 array);
2. the server adds the masked vectors mod 2^32 and decodes the totals.

A site lost between its evaluate reply and its masked vector leaves its peers' masks in the sum: the
server starts again with the sites still present ("validation-keys" for fresh keys on the sums they
hold, then "validation-mask"), at most ``MAX_ATTEMPTS`` sessions, as the secure counts do; nothing is
scored again. With fewer than ``MIN_SITES`` sites the round gets no validation sums (a "sum" over one
site is its own sums) and cannot be chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Message, MessageType
from flwr.common.logger import log

from common.records import (
    ARRAYS,
    MASKED_VALIDATION,
    VALIDATION_KEYS,
    VALIDATION_MASK,
)
from common.secure_sum import unmask_sum
from common.secure_validation import MAX_SITES, unpack_validation, vector_length
from common.validation import ValidationStats
from server.secure_counts import MAX_ATTEMPTS, MIN_SITES, Exchange, public_keys, session_message


def validation_session(server_round: int, attempt: int = 1) -> str:
    """The session name of a round's secure validation sum (attempt 1 is named in the evaluate message)."""
    return f"validation-{server_round}-{attempt}"


def secure_validation_sum(
    keys: Mapping[int, bytes],
    exchange: Exchange,
    server_round: int,
    n_labels: int,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    site_name: Callable[[int], str] = str,
) -> tuple[ValidationStats, int] | None:
    """The summed validation sums of the sites that sent ``keys`` with their evaluate replies, and how
    many sites they cover; None when fewer than ``MIN_SITES`` take part or every session lost a site."""
    keys = dict(keys)
    length = vector_length(n_labels)
    if len(keys) > MAX_SITES:
        log(
            WARNING,
            "secure validation: %d sites, at most %d fit the encoding; no validation sums",
            len(keys),
            MAX_SITES,
        )
        return None
    for attempt in range(1, max_attempts + 1):
        session = validation_session(server_round, attempt)
        if attempt > 1:
            replies = exchange(
                "secure validation: keys", [_step(n, server_round, session, attempt, VALIDATION_KEYS) for n in keys]
            )
            keys = public_keys(replies)
        if len(keys) < MIN_SITES:
            log(
                WARNING,
                "secure validation: %d site(s) in session %s, %d needed (a sum over one site is its own "
                "histograms); round %d gets no validation score and cannot be chosen",
                len(keys),
                session,
                MIN_SITES,
                server_round,
            )
            return None
        peers = [(p, keys[p]) for p in sorted(keys)]
        replies = exchange(
            "secure validation: masked sums",
            [_step(n, server_round, session, attempt, VALIDATION_MASK, peers) for n, _ in peers],
        )
        masked = {}
        for r in replies:
            record = r.content[ARRAYS] if ARRAYS in r.content else {}
            array = record[MASKED_VALIDATION].numpy() if MASKED_VALIDATION in record else None
            if array is not None and array.dtype == np.uint32 and array.shape == (length,):
                masked[int(r.metadata.src_node_id)] = array
            else:  # the reply schema rejects these before: a second line of defence
                log(
                    WARNING,
                    "secure validation: %s sent a malformed masked vector; treated as lost",
                    site_name(int(r.metadata.src_node_id)),
                )
        lost = [n for n in keys if n not in masked]
        if not lost:
            stats = unpack_validation(unmask_sum(masked[n] for n in sorted(masked)), n_labels)
            log(
                INFO, "secure validation: %d site(s) summed in session %s (no site's own sums seen)", len(keys), session
            )
            return stats, len(keys)
        keys = {n: keys[n] for n in sorted(masked)}
        log(
            WARNING,
            "secure validation: %s sent no masked sums in session %s; their pairwise masks do not cancel, so "
            "this sum is unusable. %s with the %d site(s) still present (attempt %d of %d)",
            ", ".join(site_name(n) for n in lost),
            session,
            "Restarting" if attempt < max_attempts else "Not restarting",
            len(keys),
            attempt,
            max_attempts,
        )
    log(
        WARNING,
        "secure validation: sites kept dropping out in %d sessions; round %d cannot be chosen",
        max_attempts,
        server_round,
    )
    return None


def _step(
    node: int,
    server_round: int,
    session: str,
    attempt: int,
    phase: str,
    peers: list[tuple[int, bytes]] | None = None,
) -> Message:
    group = f"{server_round}-validation-{attempt}"
    return session_message(node, server_round, session, phase, peers, MessageType.EVALUATE, group)
