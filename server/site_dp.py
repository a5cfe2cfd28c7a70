"""Site-level DP (``privacy.site-dp``): Flower's fixed-clipping wrappers around a stage's strategy.

Each round every site's whole update (the arrays it sends minus the global ones it received) is
clipped to L2 norm C = ``privacy.site-clipping-norm``, by the server (``server-fixed``) or by the
site itself (``client-fixed``: Flower's ``fixedclipping_mod``, ``client.federation.site_clipping``),
and the mean of the n sites' clipped updates gets Gaussian noise of std sigma C / n, sigma =
``privacy.site-noise-multiplier``. The clipping and the noise are Flower's own
(``flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}SideFixedClipping``); what this module
adds is what the Federation's own round loop needs of them:

- clipping against the arrays the sites were sent (FedBN: without its local norm keys), each
  reply's arrays put in their key order first (Flower pairs a reply's arrays with the sent ones by
  position, and a site chooses its order);
- n = the replies aggregated in the round (a site may fail or be rejected after it was sampled), so
  the noise always covers the mean it is added to;
- every site weighted equally: the noise covers a plain mean, where one site moves the aggregate by
  at most C / n, not a mean weighted by the sites' own ``num-examples``;
- ``client-fixed``: the server, which still sees each update, leaves out one above C (a site
  without the mod);
- the noise drawn from OS entropy, never from a numpy state that the run's public seed could have set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import get_norm

from common.records import ARRAYS, METRICS, NUM_EXAMPLES
from common.run_config import PrivacyOptions
from server.replies import with_metric

#: Relative slack on C when the server checks a site's own clipping (the scaling's rounding at the site).
CLIP_SLACK = 1e-4


class SiteRound:
    """Mixin in front of one of Flower's fixed-clipping wrappers: what the Federation's loop needs (module doc)."""

    strategy: Strategy
    clipping_norm: float
    num_sampled_clients: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent = ArrayRecord()  # the arrays of this round's train messages

    @property
    def min_train_nodes(self) -> int:
        """The wrapped strategy's: fewer usable replies and the Federation skips the round."""
        return int(getattr(self.strategy, "min_train_nodes", 1))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's train messages; keeps the arrays they carry (FedBN: without its local norm keys)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent = messages[0].content[ARRAYS] if messages else ArrayRecord()
        refuse_integer_arrays(self.sent)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipping and noise over the admissible replies, each weighted 1 and n = their number."""
        replies = self.admissible(list(replies))
        self.num_sampled_clients = max(len(replies), 1)
        with entropy_noise():
            arrays, metrics = super().aggregate_train(server_round, [equally_weighted(r, self.sent) for r in replies])
        if metrics is not None:  # what the sites trained on, not the 1 each was weighted by
            metrics[NUM_EXAMPLES] = sum(int(r.content[METRICS][NUM_EXAMPLES]) for r in replies)
        return arrays, metrics

    def admissible(self, replies: list[Message]) -> list[Message]:
        """The replies to aggregate (the server clips them all itself)."""
        return replies


class ServerSideSiteDP(SiteRound, DifferentialPrivacyServerSideFixedClipping):
    """``privacy.site-dp = "server-fixed"``: the server clips every site's update, then adds the noise."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = self.sent  # what Flower clips against: what the sites received
        return messages


class ClientSideSiteDP(SiteRound, DifferentialPrivacyClientSideFixedClipping):
    """``privacy.site-dp = "client-fixed"``: each site clips its own update (Flower sends C in the config)."""

    def admissible(self, replies: list[Message]) -> list[Message]:
        """The replies whose update is within C; one above it (a site that did not clip) is left out.
        The site adds its clipped update to float32 arrays, which may round each coordinate by half a
        float32 epsilon of the array's value: that much more is allowed."""
        rounding = float(np.finfo(np.float32).eps) * get_norm(self.sent.to_numpy_ndarrays())
        bound = self.clipping_norm * (1 + CLIP_SLACK) + rounding
        kept = []
        for reply in replies:
            norm = update_norm(reply.content[ARRAYS], self.sent)
            if norm <= bound:
                kept.append(reply)
            else:
                log(
                    WARNING,
                    "privacy.site-dp: node %d sent an update of norm %.4g > privacy.site-clipping-norm %.4g "
                    "(not clipped at the site); left out of the aggregate",
                    reply.metadata.src_node_id,
                    norm,
                    self.clipping_norm,
                )
        return kept


#: ``privacy.site-dp`` -> the wrapper.
SITE_DP_WRAPPERS: dict[str, type[SiteRound]] = {"server-fixed": ServerSideSiteDP, "client-fixed": ClientSideSiteDP}


def with_site_dp(strategy: Strategy, privacy: PrivacyOptions) -> Strategy:
    """``strategy`` inside the wrapper ``privacy.site_dp`` names; itself with ``"off"``."""
    if privacy.site_dp == "off":
        return strategy
    cls = SITE_DP_WRAPPERS[privacy.site_dp]
    sampled = max(int(getattr(strategy, "min_train_nodes", 1)), 1)  # set again every round (SiteRound)
    return cls(strategy, privacy.site_noise_multiplier, privacy.site_clipping_norm, sampled)


def equally_weighted(reply: Message, sent: ArrayRecord) -> Message:
    """A copy of ``reply`` weighted 1, its arrays in the key order of ``sent`` (the reply itself is unchanged)."""
    out = with_metric(reply, NUM_EXAMPLES, 1)
    arrays = reply.content[ARRAYS]
    out.content[ARRAYS] = ArrayRecord({k: arrays[k] for k in sent.keys()})
    return out


def update_norm(arrays: ArrayRecord, sent: ArrayRecord) -> float:
    """L2 norm of a site's whole update (Flower's ``get_norm``), key by key against what it was sent."""
    return get_norm([arrays[k].numpy().astype(np.float64) - v.numpy() for k, v in sent.items()])


def refuse_integer_arrays(arrays: ArrayRecord) -> None:
    """Flower scales each update by C / norm in place, which an integer array (a BatchNorm step
    counter) cannot take, and adds noise to it; every array sent must be floating point."""
    ints = [k for k, v in arrays.items() if np.dtype(v.dtype).kind != "f"]
    if ints:
        raise ValueError(f"privacy.site-dp clips and noises every array sent, but {ints[:3]} are not floating point")


@contextmanager
def entropy_noise() -> Iterator[None]:
    """Flower draws the noise from numpy's global RNG: seed it from OS entropy for the block, then
    give the rest of the server its own state back (so its reproducibility is kept)."""
    state = np.random.get_state()
    np.random.seed(None)
    try:
        yield
    finally:
        np.random.set_state(state)
