"""The site's half of secure model updates (``privacy.secure-updates``, ``common.secure_updates``).

Steps: "update-keys" (a fresh key pair), "update-shares" (encrypted Shamir shares of the private key
and a fresh self-mask seed, one per site), the train round itself (the update leaves the site only
masked, ``masked_update_record``), "update-unmask" (this site's shares of the survivors' seeds and of
the dropped sites' keys). The session's secrets live in ``context.state``, which Flower keeps in the
SuperNode's memory for the run and hands to every ClientApp process; never on disk, never sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.federation.errors import SiteError
from client.federation.exchange import site_record
from client.federation.node import SiteNode
from common.records import (
    CONFIG,
    DROPPED,
    KEY_NODES,
    KEY_SHARES,
    MASKED_UPDATE,
    METRICS,
    PUBLIC_KEY,
    SECURE,
    SECURE_SESSION,
    SEED_NODES,
    SEED_SHARES,
    SHARE_DATA,
    SHARE_NODES,
    SITE,
    SURVIVORS,
    UPDATE_KEYS,
    UPDATE_SHARES,
    UPDATE_UNMASK,
    pack_peers,
    unpack_peers,
)
from common.secure_sum import SecureSumError, generate_key_pair
from common.secure_updates import (
    Rings,
    encode_update,
    flatten,
    layout_of,
    make_shares,
    mask_update,
    new_self_seed,
    reveal,
    value_range,
)

#: ``context.state`` record of this site's secrets for the current secure-updates session.
UPDATE_STATE = "secure-update-session"
_PRIVATE, _SEED, _STEP = "private-key", "self-seed", "step"


def _reply(msg: Message, site: SiteNode, secure: dict) -> Message:
    return Message(
        RecordDict({METRICS: MetricRecord(), SECURE: ConfigRecord(secure), SITE: site_record(site)}), reply_to=msg
    )


def _held(context: Context, session: str, step: str) -> ConfigRecord:
    held = context.state.get(UPDATE_STATE)
    if held is None or str(held.get(SECURE_SESSION)) != session or str(held.get(_STEP)) != step:
        raise SiteError(f"no secure-updates session {session!r} at the step before {step!r} here (restarted?)")
    return held


def update_step(phase: str, msg: Message, context: Context, site: SiteNode) -> Message:
    """Answer one query step of the protocol (the train step is ``masked_update_record``)."""
    session = str(msg.content[CONFIG][SECURE_SESSION])
    own = int(msg.metadata.dst_node_id)
    try:
        if phase == UPDATE_KEYS:
            private, public = generate_key_pair()
            context.state[UPDATE_STATE] = ConfigRecord({SECURE_SESSION: session, _PRIVATE: private, _STEP: phase})
            return _reply(msg, site, {PUBLIC_KEY: public})
        if phase == UPDATE_SHARES:
            held = _held(context, session, UPDATE_KEYS)
            peers, seed = unpack_peers(msg.content[SECURE]), new_self_seed()
            boxes = make_shares(own, bytes(held[_PRIVATE]), seed, peers, session)
            context.state[UPDATE_STATE] = ConfigRecord(
                {
                    SECURE_SESSION: session,
                    _PRIVATE: bytes(held[_PRIVATE]),
                    _SEED: seed,
                    _STEP: phase,
                    **pack_peers(peers),
                }
            )
            return _reply(msg, site, {SHARE_NODES: list(boxes), SHARE_DATA: list(boxes.values())})
        if phase == UPDATE_UNMASK:
            held = _held(context, session, "train")
            del context.state[UPDATE_STATE]  # one session, one unmask answer
            sec = msg.content[SECURE]
            inbox = dict(zip((int(n) for n in held[SHARE_NODES]), (bytes(b) for b in held[SHARE_DATA])))
            seeds, keys = reveal(
                own, bytes(held[_PRIVATE]), unpack_peers(held), session, inbox, list(sec[SURVIVORS]), list(sec[DROPPED])
            )
            return _reply(
                msg,
                site,
                {
                    SEED_NODES: list(seeds),
                    SEED_SHARES: list(seeds.values()),
                    KEY_NODES: list(keys),
                    KEY_SHARES: list(keys.values()),
                },
            )
    except SecureSumError as exc:
        raise SiteError(f"secure updates refused: {exc}") from None
    raise SiteError(f"unknown secure updates step {phase!r}")


def masked_update_record(
    msg: Message, context: Context, trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], examples: int
) -> ArrayRecord:
    """The train reply's arrays under secure updates: (trained - received), weighted by ``examples``
    and masked, as one uint32 array. The shares that came with the message are kept for the unmask
    step. A non-finite update, or one beyond its public range, is refused here (the server cannot see
    it, and clipping would change the mean): the site counts as dropped."""
    sec = msg.content[SECURE]
    session = str(sec[SECURE_SESSION])
    held = _held(context, session, UPDATE_SHARES)
    moved = {k: np.asarray(trained[k], np.float64) - np.asarray(received[k], np.float64) for k in received}
    update, _ = flatten(moved)
    if not np.all(np.isfinite(update)):
        raise SiteError("the trained update is not finite; not sent (this site drops out of the round)")
    for key, delta in moved.items():
        bound = value_range(key, np.asarray(received[key]).dtype)
        if delta.size and float(np.max(np.abs(delta))) > bound:
            raise SiteError(
                f"{key} moved by {float(np.max(np.abs(delta))):.4g}, beyond the public range +-{bound:g} of secure "
                "updates (common.secure_updates); not sent, never clipped (this site drops out of the round)"
            )
    rings = Rings.of(layout_of(received))
    try:
        masked = mask_update(
            encode_update(update, examples, rings),
            int(msg.metadata.dst_node_id),
            bytes(held[_PRIVATE]),
            bytes(held[_SEED]),
            unpack_peers(held),
            session,
            rings.narrow,
        )
    except SecureSumError as exc:
        raise SiteError(f"secure updates refused: {exc}") from None
    context.state[UPDATE_STATE] = ConfigRecord(
        {
            **{k: held[k] for k in held},
            _STEP: "train",
            SHARE_NODES: [int(n) for n in sec[SHARE_NODES]],
            SHARE_DATA: [bytes(b) for b in sec[SHARE_DATA]],
        }
    )
    return ArrayRecord({MASKED_UPDATE: Array(masked.astype(np.uint32))})
