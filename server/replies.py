"""The server's side of a message exchange: send, wait, and keep what the replies say about sites.

Sites that fail, time out, vanish or refuse by their policy are logged with their site id, node id,
the reason and when it was seen (one history entry per site and round), and the exchange goes on
with the others. Every reply is checked against its phase's ``ReplySchema``
(``server.validation``) before anything of it is used: one that breaks a rule (a NaN in an array,
arrays of another model, a count out of range, ...) is rejected, logged with the site, the rule and
the key (never a value), and listed under the round's ``rejected``.

An exchange returns its replies in site order (site id, then node id), never in arrival order:
FedAvg's weighted sum and the validation sums are float additions whose bits depend on their order,
and the order in which sites finish varies from run to run (docs/design.md §5, Reproducibility).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.records import (
    CONFIG,
    FROZEN_UNET,
    GAN_GENERATOR,
    HELLO_ACTION,
    METRICS,
    PRIVACY_EPSILON,
    PRIVACY_EXHAUSTED,
    REFUSAL,
    REFUSAL_REASONS,
    REFUSAL_RULES,
    SERVER_ROUND,
    SITE,
    SITE_ID,
)
from common.validation import ValidationStats
from server.history import finite_or_none
from server.validation import SITE_ID_PATTERN, Problem, ReplySchema, check_reply, content_bytes

#: Problems of one rejected reply kept in the history (the first ones; the log names the first).
PROBLEMS_KEPT = 5

#: How often the server asks for replies. Flower's own ``Grid.send_and_receive`` waits 3 s between
#: pulls, which adds up to 3 s to each of a round's two or three exchanges.
POLL_SECONDS = 0.2


def action_queries(nodes: Iterable[int], action: str, server_round: int, group_id: str) -> list[Message]:
    """One ``query.<action>`` message to each node, its CONFIG holding only the server round."""
    config = ConfigRecord({SERVER_ROUND: server_round})
    return [
        Message(
            RecordDict({CONFIG: config}),
            dst_node_id=node,
            message_type=f"{MessageType.QUERY}.{action}",
            group_id=group_id,
        )
        for node in nodes
    ]


@dataclass
class Messenger:
    """Exchanges a round's messages with the sites on ``grid``; learns each node's site id from its
    replies, and which frozen U-Net (and global generator) each node holds. Every exchange adds the
    payload bytes sent to and received from each site to its round's ``entry["bytes"]``."""

    grid: Grid
    timeout: float | None  # ``rounds.timeout``; None: wait for every reply
    sites: dict[int, str] = field(default_factory=dict)  # node id -> site id, learned from replies
    unet_sent: dict[int, str] = field(default_factory=dict)  # node id -> digest of the frozen U-Net it holds
    generator_sent: dict[int, str] = field(default_factory=dict)  # node id -> digest of the GAN stage's generator
    greeted: set[int] = field(default_factory=set)  # nodes sent a ``query.hello`` (once each)

    def exchange(
        self,
        phase: str,
        messages: list[Message],
        entry: dict,
        digest: str = "",
        schema: ReplySchema | None = None,
        generator: str = "",
    ) -> list[Message]:
        """Send, wait up to ``rounds.timeout``, return the replies that pass ``schema`` in site order
        (``in_site_order``); log every failure and rejection. A site that replied to a stage-2
        message holds the U-Net ``digest`` (and the global generator ``generator``) from then on.

        Each reply is matched to the message it answers (``reply_to_message_id``), never taken for
        its ``src_node_id``'s: the SuperLink's own error replies ("node unavailable") carry the
        SuperLink's id there. Nodes not yet named are asked who they are first (``introduce``)."""
        if not messages:
            return []
        self.introduce({m.metadata.dst_node_id for m in messages}, entry)
        return self._exchange(phase, messages, entry, digest, schema, generator)

    def introduce(self, nodes: Iterable[int], entry: dict) -> None:
        """``query.hello`` to every node whose site id is still unknown, so that a site that fails
        from its first real message on is named in the history (and one whose policy refuses the run says so)."""
        unknown = sorted(set(nodes) - set(self.sites) - self.greeted)
        if not unknown:
            return
        self.greeted.update(unknown)
        rnd = int(entry.get("round", 0))
        hellos = action_queries(unknown, HELLO_ACTION, rnd, f"{rnd}-hello")
        self._exchange("hello", hellos, entry, "")

    def _exchange(
        self,
        phase: str,
        messages: list[Message],
        entry: dict,
        digest: str,
        schema: ReplySchema | None = None,
        generator: str = "",
    ) -> list[Message]:
        started = time.monotonic()
        replies, sent = send_and_receive(self.grid, messages, self.timeout)
        good: list[tuple[int, Message]] = []
        answered = set()
        for reply, seconds in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            after = seconds - started
            if reply.has_error():
                self.failure(phase, node, reply.error.reason or f"error code {reply.error.code}", entry, after)
                continue
            self._learn_site(node, reply)
            if REFUSAL in reply.content:
                self.failure(phase, node, refusal_reason(reply.content[REFUSAL]), entry, after)
                continue
            problems = check_reply(reply.content, reply.metadata.message_type, schema) if schema else []
            if not schema and not (SITE in reply.content and METRICS in reply.content):
                problems = [Problem("record-missing", f"{SITE}/{METRICS}")]
            if problems:
                self.reject(phase, node, problems, entry)
                continue
            if digest:
                self.unet_sent[node] = digest
            if generator:
                self.generator_sent[node] = generator
            good.append((node, reply))
        waited = time.monotonic() - started
        for node in sorted(set(sent.values()) - answered):
            reason = f"no reply within {self.timeout or 'unlimited'} s (site down or too slow)"
            self.failure(phase, node, reason, entry, waited)
        self._count_bytes(entry, messages, [(sent.get(r.metadata.reply_to_message_id), r) for r, _ in replies])
        return self.in_site_order(good)

    def in_site_order(self, replies: Iterable[tuple[int, Message]]) -> list[Message]:
        """``(node, reply)`` pairs as replies sorted by site id, then node id: every aggregate (a float
        sum) then adds the sites in the same order whichever site finished first."""
        return [r for _, r in sorted(replies, key=lambda nr: (self.sites.get(nr[0], ""), nr[0]))]

    def _count_bytes(self, entry: dict, messages: list[Message], replies: list[tuple[int | None, Message]]) -> None:
        """Add each site's payload bytes (``server.validation.content_bytes``) to ``entry["bytes"]``:
        ``{site: {"sent", "received"}}`` over every exchange of the round; error replies count 0."""
        traffic = entry.setdefault("bytes", {})

        def add(node: int, way: str, n: int) -> None:
            site = traffic.setdefault(self.sites.get(node, str(node)), {"sent": 0, "received": 0})
            site[way] += n

        for m in messages:
            add(m.metadata.dst_node_id, "sent", content_bytes(m.content))
        for node, reply in replies:
            if node is not None and not reply.has_error():
                add(node, "received", content_bytes(reply.content))

    def _learn_site(self, node: int, reply: Message) -> None:
        """The node's site id, from its reply's SITE record when it holds a well-formed one."""
        record = reply.content[SITE] if SITE in reply.content else None
        sid = record.get(SITE_ID) if hasattr(record, "get") else None
        if isinstance(sid, str) and SITE_ID_PATTERN.fullmatch(sid):
            self.sites[node] = sid

    def reject(self, phase: str, node: int, problems: list[Problem], entry: dict) -> None:
        """Log and record a reply that broke ``problems``: site, rule and key, never a value."""
        site, first = self.sites.get(node, "unknown site"), problems[0]
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        log(
            WARNING,
            "%s: %s (node %d) reply rejected: rule %s, key %s%s",
            phase,
            site,
            node,
            first.rule,
            first.key,
            more,
        )
        entry.setdefault("rejected", []).append(
            {
                "phase": phase,
                "site": site,
                "node": node,
                "rule": first.rule,
                "key": first.key,
                "reason": "; ".join(str(p) for p in problems[:PROBLEMS_KEPT]),
                "problems": [{"rule": p.rule, "key": p.key} for p in problems[:PROBLEMS_KEPT]],
                "n_problems": len(problems),
            }
        )
        self.unet_sent.pop(node, None)  # it may not hold the U-Net (or generator) it was sent
        self.generator_sent.pop(node, None)

    def failure(self, phase: str, node: int, reason: str, entry: dict, seconds: float | None = None) -> None:
        """Log a node's failure; the round's history keeps one entry per node, with the first
        reason and every phase the node failed in."""
        site = self.sites.get(node, "unknown site")
        when = "" if seconds is None else f" after {seconds:.1f} s"
        log(WARNING, "%s: %s (node %d) failed%s: %s", phase, site, node, when, reason)
        self.unet_sent.pop(node, None)  # it may have lost its copy; send it again next time
        self.generator_sent.pop(node, None)
        for f in entry["failures"]:
            if f["node"] == node:
                f["site"] = site if f["site"] == "unknown site" else f["site"]
                f["phases"] = [*f.get("phases", [f["phase"]]), phase]
                return
        item = {"phase": phase, "site": site, "node": node, "reason": reason, "phases": [phase]}
        if seconds is not None:
            item["seconds"] = round(seconds, 3)
        entry["failures"].append(item)

    def site_of(self, reply: Message) -> str:
        return self.sites.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))

    def summed_validation(self, replies: list[Message], n_labels: int) -> tuple[ValidationStats | None, int]:
        """The replies' validation sums added up (``common.validation``) and how many sites gave them; a
        reply whose sums are missing or malformed is left out and logged by site and error type."""
        parts = []
        for r in replies:
            try:
                parts.append(ValidationStats.from_metrics(r.content[METRICS], n_labels))
            except (KeyError, ValueError) as exc:
                log(WARNING, "validation sums of site %s unusable (%s)", self.site_of(r), type(exc).__name__)
        return (sum(parts[1:], parts[0]) if parts else None), len(parts)

    def site_name(self, node: int) -> str:
        """How logs name a node: its site id (once known) and node id."""
        return f"{self.sites.get(node, 'unknown site')} (node {node})"

    def attach_unet(self, messages: Iterable[Message], unet: ArrayRecord | None, digest: str) -> list[Message]:
        """Add the frozen U-Net to the messages of sites not known to hold it already."""
        return _attach_once(messages, FROZEN_UNET, unet, digest, self.unet_sent)

    def attach_generator(
        self, messages: Iterable[Message], generator: ArrayRecord | None, digest: str
    ) -> list[Message]:
        """Stage 2 after a GAN stage: add the global generator to the messages of sites not known to hold it."""
        return _attach_once(messages, GAN_GENERATOR, generator, digest, self.generator_sent)


def _attach_once(
    messages: Iterable[Message], name: str, record: ArrayRecord | None, digest: str, held: dict[int, str]
) -> list[Message]:
    """``record`` added as ``name`` to the messages of nodes whose ``held`` digest is not ``digest``."""
    messages = list(messages)
    if record is None:
        return messages
    return [m if held.get(m.metadata.dst_node_id) == digest else with_record(m, name, record) for m in messages]


def send_and_receive(
    grid: Grid, messages: list[Message], timeout: float | None
) -> tuple[list[tuple[Message, float]], dict[str, int]]:
    """``Grid.send_and_receive`` with a short pull interval (``POLL_SECONDS``): the replies with the
    ``time.monotonic()`` each was pulled at, and every sent message's id with its destination node."""
    ids = list(grid.push_messages(messages))
    sent = {msg_id: m.metadata.dst_node_id for msg_id, m in zip(ids, messages) if msg_id}
    pending = set(sent)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[tuple[Message, float]] = []
    while pending:
        got = list(grid.pull_messages(pending))
        now = time.monotonic()
        replies += [(m, now) for m in got]
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(POLL_SECONDS)
    return replies, sent


def refusal_reason(record: ConfigRecord) -> str:
    """A site policy's refusal as the history records it: every rule and why."""
    rules = list(record.get(REFUSAL_RULES, []))
    reasons = list(record.get(REFUSAL_REASONS, []))
    return "refused by site policy: " + "; ".join(f"{r}: {why}" for r, why in zip(rules, reasons))


def with_record(msg: Message, name: str, record: ArrayRecord) -> Message:
    """A copy of ``msg`` with one more record (strategies share one RecordDict among messages)."""
    return _copy(msg, RecordDict({**dict(msg.content.items()), name: record}), msg.metadata.message_type)


def retyped(msg: Message, message_type: str) -> Message:
    """A copy of ``msg`` as another message type: a strategy's train message as ``train.gan``."""
    return _copy(msg, msg.content, message_type)


def _copy(msg: Message, content: RecordDict, message_type: str) -> Message:
    return Message(
        content, dst_node_id=msg.metadata.dst_node_id, message_type=message_type, group_id=msg.metadata.group_id
    )


def with_metric(reply: Message, key: str, value: int | float) -> Message:
    """A copy of ``reply`` with one metric changed; the site's reply itself stays as it came."""
    metrics = MetricRecord({**dict(reply.content[METRICS].items()), key: value})
    return Message(metadata=reply.metadata, content=RecordDict({**dict(reply.content.items()), METRICS: metrics}))


def metrics_dict(record: MetricRecord) -> dict[str, Any]:
    """A MetricRecord as plain JSON-able values (NaN as None)."""
    return {
        k: (list(v) if isinstance(v, list) else finite_or_none(float(v)) if isinstance(v, float) else v)
        for k, v in record.items()
    }


def idle_reason(metrics: MetricRecord) -> str:
    """Why a site's train reply has nothing to aggregate (num-examples 0)."""
    if int(metrics.get(PRIVACY_EXHAUSTED, 0)):
        return f"did not train: privacy budget spent (epsilon {float(metrics.get(PRIVACY_EPSILON, math.nan)):.3f})"
    return "had nothing to learn from"
