"""``privacy.site-dp = "client-fixed"``: the site clips its whole update itself, with Flower's ``fixedclipping_mod``.

The server's ``DifferentialPrivacyClientSideFixedClipping`` (``server.site_dp``) sends the bound C in
the train config; Flower's mod clips the reply's arrays minus the ones received to norm C before they
leave. Flower's mod takes a message of exactly one ArrayRecord, and a stage-2 train message holds two
(the classifier to train and the frozen U-Net): the mod is shown the classifier and the config only,
while the handler gets the whole message. Runs without the option pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.mod import fixedclipping_mod

from common.records import ARRAYS, CONFIG
from common.run_config import run_config_key

#: The run-config key and the value that ask every site to clip its own update.
SITE_DP_KEY = run_config_key("privacy", "site_dp")
CLIENT_FIXED = "client-fixed"


def site_clipping_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod`` around the train handler when the run asks the sites to clip."""
    if msg.metadata.message_type != MessageType.TRAIN or context.run_config.get(SITE_DP_KEY) != CLIENT_FIXED:
        return call_next(msg, context)
    return fixedclipping_mod(trained_half(msg), context, lambda _, ctx: call_next(msg, ctx))


def trained_half(msg: Message) -> Message:
    """``msg`` with only the arrays being trained (what the update is measured against) and the config."""
    content = RecordDict({ARRAYS: msg.content[ARRAYS], CONFIG: msg.content[CONFIG]})
    return Message(metadata=msg.metadata, content=content)
