"""A small in-process Flower ``Grid`` that hands messages straight to ClientApp handlers.

``FakeGrid`` delivers each pushed message to the ``ClientApp`` of its destination node with that
node's ``Context`` (as a SuperNode would), turns an exception into an error reply (as the SuperNode
does), can keep a node silent (a site that times out or vanished: the server waits out
``rounds.timeout``) or answer for it as the SuperLink does for a node that died (``unavailable``: an
error reply whose ``src_node_id`` is the SuperLink's), and records every message both ways.
Also: ``set_task_identity`` (a ``Message`` built outside a Flower process needs it, docs/design.md §6),
``make_context``, ``make_message`` and ``make_reply`` (a site's reply as the server receives it).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common.config import get_fused_config_from_dir
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.records import ARRAYS, METRICS
from common.run_config import StrategyOptions, parse_run_config

REPO = Path(__file__).resolve().parents[2]
RUN_ID = 4242
SERVER_NODE = 1


def set_task_identity() -> None:
    """What a Flower process sets before any ``Message(...)`` is created."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SERVER_NODE


def run_config(**overrides: Any) -> dict[str, Any]:
    """The app's run config as ``flwr run`` fuses it: pyproject defaults plus overrides."""
    return dict(get_fused_config_from_dir(REPO, {k.replace("_", "-"): v for k, v in overrides.items()}))


def tiny_run_config(data_root: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A one-round-per-stage run over ``data_root``'s sites at 32 px, writing to ``out/run``:
    what the server tests share; each adds the keys its case needs (dotted keys, as in pyproject)."""
    return run_config(
        **{
            "data.root": str(data_root),
            "output.dir": str(out),
            "output.name": "run",
            "model.image-size": 32,
            "train.local-steps": 1,
            "train.batch-size": 4,
            "rounds.stage1": 1,
            "rounds.stage2": 1,
            **overrides,
        }
    )


def strategy_options(**fields: Any) -> StrategyOptions:
    """The default run config's ``strategy.*`` group with ``fields`` changed (and checked again)."""
    return replace(parse_run_config(run_config()).strategy, **fields)


def write_prepared_sites(
    root: Path, n_sites: int, run_cfg: dict[str, Any], seed_offset: int = 0, source: int = 40
) -> Path:
    """``n_sites`` small site folders under ``root`` (site-01 ...), each already preprocessed into
    ``root/.cache`` with the run config's preprocessing, as ``flwr-client prepare`` leaves a site."""
    from common.run_config import model_from_run_config
    from simulations.sites import prepare_caches
    from tests.helpers.data import write_site

    for i in range(n_sites):
        write_site(root / f"site-{i + 1:02d}", n_studies=5, shape=(4, source, source), seed=10 * i + seed_offset)
    prepare_caches(root, model_from_run_config(run_cfg)[1], progress=False)
    return root


def site_grid(app: Callable[[Message, Context], Message], rc: dict[str, Any], n_sites: int) -> FakeGrid:
    """A FakeGrid of ``n_sites`` simulated nodes 100, 101, ... running ``app``, node i on partition i."""
    return FakeGrid(
        {
            100 + i: (app, make_context({"partition-id": i, "num-partitions": n_sites}, rc, node_id=100 + i))
            for i in range(n_sites)
        }
    )


def make_context(node_config: dict[str, Any], run_cfg: dict[str, Any], node_id: int = 7) -> Context:
    return Context(
        run_id=RUN_ID, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config=dict(run_cfg)
    )


_message_ids = itertools.count(1)


def make_message(content: RecordDict, message_type: str, dst_node_id: int = 7, group_id: str = "1") -> Message:
    """An instruction message as the SuperLink delivers it (metadata set, no TaskIdentity needed)."""
    meta = Metadata(
        run_id=RUN_ID,
        message_id=f"m{next(_message_ids)}",
        src_node_id=SERVER_NODE,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(metadata=meta, content=content)


@dataclass
class Sent:
    """One delivery: the instruction, and the reply (None when the node never answered)."""

    message: Message
    reply: Message | None


@dataclass
class FakeGrid(Grid):
    """Nodes ``node_id -> (ClientApp, Context)``; ``drop(node)`` silences a node (a timeout)."""

    nodes: dict[int, tuple[Callable[[Message, Context], Message], Context]]
    log: list[Sent] = field(default_factory=list)
    silent: set[int] = field(default_factory=set)
    unavailable: set[int] = field(default_factory=set)
    before_delivery: Callable[[Message], None] | None = None

    def __post_init__(self) -> None:
        self._run = None
        self._replies: dict[str, Message] = {}

    # Grid's abstract interface; only send_and_receive does real work here.
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message at once; its reply waits for ``pull_messages`` (none if the node is silent)."""
        ids = []
        for msg in messages:
            msg_id = f"m{next(_message_ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id  # the SuperLink assigns ids
            ids.append(msg_id)
            if self.before_delivery is not None:
                self.before_delivery(msg)
            node = msg.metadata.dst_node_id
            if node in self.unavailable:
                self._replies[msg_id] = superlink_unavailable(msg)
                self.log.append(Sent(msg, None))
                continue
            if node not in self.nodes or node in self.silent:
                self.log.append(Sent(msg, None))
                continue
            app, context = self.nodes[node]
            try:
                reply = app(msg, context)
            except Exception as exc:  # as the SuperNode: an error reply carrying the exception's text
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg
                )
            self.log.append(Sent(msg, reply))
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def superlink_unavailable(msg: Message) -> Message:
    """The SuperLink's reply for a node that stopped sending heartbeats: from the SuperLink's own node
    id, to the message's id, "node unavailable" (as Flower 1.42's linkstate builds it)."""
    meta = Metadata(
        run_id=msg.metadata.run_id,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=msg.metadata.message_id,
        group_id=msg.metadata.group_id,
        created_at=0.0,
        ttl=60.0,
        message_type=msg.metadata.message_type,
    )
    return Message(metadata=meta, error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE_ERROR_REASON))


def make_reply(arrays: dict[str, np.ndarray] | None, metrics: dict, node_id: int, error: str | None = None) -> Message:
    """A train reply as the ServerApp receives it."""
    meta = Metadata(
        run_id=1,
        message_id=f"r{node_id}",
        src_node_id=node_id,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    if error is not None:
        return Message(metadata=meta, error=Error(code=2, reason=error))
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(metadata=meta, content=content)
