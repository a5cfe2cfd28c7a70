"""The site's half of the secure counts round (``privacy.secure-counts``, ``common.secure_sum``):
"keys" (reply with a fresh public key) and "mask" (reply with the masked counts only)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.federation.errors import SiteError
from client.federation.exchange import site_record
from client.federation.node import SiteNode
from common.records import (
    CONFIG,
    MASKED_COUNTS,
    METRICS,
    PUBLIC_KEY,
    SECURE,
    SECURE_SESSION,
    SITE,
    unpack_peers,
)
from common.secure_sum import SecureSumError, generate_key_pair, mask_vector

#: ``context.state`` record holding this site's private X25519 key of the current secure-sum session.
#: Flower keeps ``context.state`` for the run in the SuperNode's memory and hands it to every
#: ClientApp process (as its SecAgg+ mod does); it is never written to disk nor sent to the server.
SECURE_STATE = "secure-sum-key"
PRIVATE_KEY = "private-key"


def secure_counts_keys(msg: Message, context: Context, site: SiteNode) -> Message:
    """Step 1: a fresh key pair for this session; the private half stays in ``context.state``."""
    session = str(msg.content[CONFIG][SECURE_SESSION])
    private, public = generate_key_pair()
    context.state[SECURE_STATE] = ConfigRecord({SECURE_SESSION: session, PRIVATE_KEY: private})
    return Message(
        RecordDict({METRICS: MetricRecord(), SECURE: ConfigRecord({PUBLIC_KEY: public}), SITE: site_record(site)}),
        reply_to=msg,
    )


def secure_counts_masked(msg: Message, context: Context, site: SiteNode, counts: list[int]) -> Message:
    """Step 2: this site's counts masked with every peer's pairwise mask; the key is used once."""
    session = str(msg.content[CONFIG][SECURE_SESSION])
    held = context.state.get(SECURE_STATE)
    if held is None or str(held.get(SECURE_SESSION)) != session:
        raise SiteError("no key for this secure counts session at this site (restarted, or asked twice)")
    del context.state[SECURE_STATE]  # one session, one use: a second request for it is refused
    peers = msg.content[SECURE]
    try:
        masked = mask_vector(
            counts,
            msg.metadata.dst_node_id,
            bytes(held[PRIVATE_KEY]),
            unpack_peers(peers),
            session,
        )
    except SecureSumError as exc:
        raise SiteError(f"secure counts refused: {exc}") from None
    return Message(
        RecordDict({METRICS: MetricRecord({MASKED_COUNTS: [int(v) for v in masked]}), SITE: site_record(site)}),
        reply_to=msg,
    )
