"""The counts round before the first stage-2 round: every connected site's per-label positives and
negatives, summed into the global ``pos-weight`` (paper formula 2). With ``privacy.secure-counts``
the sum is a secure one (``server.secure_counts``): no site's own counts reach the server."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from common.records import CONFIG, LABEL_NEG, LABEL_POS, METRICS, SERVER_ROUND
from server.secure_counts import Exchange, secure_label_counts


def count_labels(
    node_ids: Iterable[int],
    exchange: Exchange,
    server_round: int,
    n_labels: int,
    *,
    secure: bool,
    site_name: Callable[[int], str] = str,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(positives, negatives) summed over the sites that replied; None when none did (or, secure,
    when the protocol never completed)."""
    if secure:
        result = secure_label_counts(node_ids, exchange, server_round, n_labels, site_name=site_name)
        if result is None:
            return None
        log(INFO, "counts round (secure): positives %s, negatives %s", result[0].tolist(), result[1].tolist())
        return result[0], result[1]
    config = ConfigRecord({SERVER_ROUND: server_round})
    messages = [
        Message(
            RecordDict({CONFIG: config}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id=f"{server_round}-counts",
        )
        for node in node_ids
    ]
    replies = exchange("count labels", messages)
    if not replies:
        log(WARNING, "counts round: no site replied; stage 2 runs with unweighted BCE until one does")
        return None
    pos = np.sum([r.content[METRICS][LABEL_POS] for r in replies], axis=0)
    neg = np.sum([r.content[METRICS][LABEL_NEG] for r in replies], axis=0)
    log(INFO, "counts round: %d site(s); positives %s, negatives %s", len(replies), pos.tolist(), neg.tolist())
    return pos, neg
