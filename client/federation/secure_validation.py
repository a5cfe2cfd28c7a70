"""The site's half of the secure validation sum (``common.secure_validation``): its validation sums
leave it only masked, whatever the run config says.

1. The evaluate message of a round that can be chosen names a session: the site scores its validation
   studies, packs the sums, keeps them with a fresh X25519 key in ``context.state``
   (``hold_validation``) and replies with the public key beside its test metrics.
2. "validation-mask" (an evaluate message carrying the session's peers): the held sums masked with every
   peer's pairwise mask, as the reply's one array; the key is used once.
3. "validation-keys" (only after a peer was lost before step 2): a fresh key for a new session, for the
   sums already held, so that nothing is scored again.

Held sums never leave unmasked: there is no step that sends them plain.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.federation.errors import SiteError
from client.federation.exchange import site_record
from client.federation.node import SiteNode
from common.records import (
    ARRAYS,
    CONFIG,
    MASKED_VALIDATION,
    METRICS,
    PUBLIC_KEY,
    SECURE,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
    SITE,
    VALIDATION_KEYS,
    VALIDATION_MASK,
    unpack_peers,
)
from common.secure_sum import SecureSumError, generate_key_pair, mask_vector
from common.secure_validation import pack_validation
from common.validation import ValidationStats

#: ``context.state`` record of this site's packed validation sums of one round and its key for the
#: current session. Flower keeps ``context.state`` in the SuperNode's memory for the run (as for the
#: secure counts' key): never on disk, never sent.
STATE = "secure-validation"
ROUND, VECTOR, PRIVATE_KEY = "round", "vector", "private-key"


def hold_validation(context: Context, stats: ValidationStats, server_round: int, session: str) -> ConfigRecord:
    """Step 1: keep this round's packed sums and a fresh key for ``session``; the SECURE record (public
    key) for the evaluate reply. Sums the encoding cannot carry exactly are refused, never clipped."""
    try:
        vector = pack_validation(stats)
    except SecureSumError as exc:
        raise SiteError(f"validation sums not sent: {exc}") from None
    context.state[STATE] = ConfigRecord({ROUND: int(server_round), VECTOR: vector.astype("<u4").tobytes()})
    return _new_key(context, str(session))


def validation_step(msg: Message, context: Context, site: SiteNode) -> Message:
    """Steps 2 and 3, for the round's sums held since its evaluate message."""
    config = msg.content[CONFIG]
    phase, session = str(config.get(SECURE_PHASE, "")), str(config.get(SECURE_SESSION, ""))
    held = context.state.get(STATE)
    if held is None or int(held[ROUND]) != int(config.get(SERVER_ROUND, -1)):
        raise SiteError("no validation sums of this round at this site (restarted, or never evaluated it)")
    if phase == VALIDATION_KEYS:
        return Message(
            RecordDict({METRICS: MetricRecord(), SECURE: _new_key(context, session), SITE: site_record(site)}),
            reply_to=msg,
        )
    if phase != VALIDATION_MASK:
        raise SiteError(f"unknown secure validation step {phase!r}")
    if PRIVATE_KEY not in held or str(held.get(SECURE_SESSION, "")) != session:
        raise SiteError("no key for this secure validation session at this site (restarted, or asked twice)")
    private = bytes(held[PRIVATE_KEY])
    del held[PRIVATE_KEY]  # one session, one use; the sums stay for a restart with the sites still present
    context.state[STATE] = held
    vector = np.frombuffer(bytes(held[VECTOR]), dtype="<u4").astype(np.uint64)
    try:
        masked = mask_vector(vector, msg.metadata.dst_node_id, private, unpack_peers(msg.content[SECURE]), session)
    except SecureSumError as exc:
        raise SiteError(f"secure validation refused: {exc}") from None
    arrays = ArrayRecord({MASKED_VALIDATION: Array(masked.astype(np.uint32))})
    return Message(RecordDict({ARRAYS: arrays, METRICS: MetricRecord(), SITE: site_record(site)}), reply_to=msg)


def _new_key(context: Context, session: str) -> ConfigRecord:
    """A fresh key pair for ``session`` beside the held sums; the public half as the SECURE record."""
    private, public = generate_key_pair()
    held = context.state[STATE]
    held[SECURE_SESSION], held[PRIVATE_KEY] = session, private
    context.state[STATE] = held
    return ConfigRecord({PUBLIC_KEY: public})
