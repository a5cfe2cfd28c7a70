"""Replies reach the aggregate in site order, never in arrival order (issue 28 item 4).

Float addition is not associative: FedAvg's weighted sum of the same site updates in another order
differs in its last bits, and over rounds (Adam, thresholds) that grew into 0.018 macro AUROC between
two runs of the same commit. ``Messenger`` returns every exchange's replies sorted by site id, so
that the global model is the same bit for bit whichever site finished first.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from common.checkpoint import load_checkpoint
from common.records import METRICS, SITE, SITE_ID
from server.federation import run_federation
from server.replies import Messenger
from tests.helpers.flower import FakeGrid, make_context, set_task_identity, tiny_run_config, write_prepared_sites

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Node ids that do not sort like their sites (Flower's node ids are random).
NODE_OF_PARTITION = {0: 300, 1: 120, 2: 210}


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


class ArrivalGrid(FakeGrid):
    """A FakeGrid whose replies arrive in the order of ``arrival`` (node ids), whatever the sending order."""

    arrival: tuple[int, ...] = ()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(super().pull_messages(message_ids))
        return sorted(got, key=lambda m: self.arrival.index(m.metadata.src_node_id))


def arrival_grid(nodes: dict, arrival: tuple[int, ...]) -> ArrivalGrid:
    grid = ArrivalGrid(nodes)
    grid.arrival = arrival
    return grid


def named_site(site: str):
    def app(msg: Message, context: Context) -> Message:
        content = RecordDict({METRICS: MetricRecord({"num-examples": 1}), SITE: ConfigRecord({SITE_ID: site})})
        return Message(content, reply_to=msg)

    return app


@pytest.mark.parametrize("arrival", [(300, 120, 210), (120, 210, 300), (210, 300, 120)])
def test_exchange_returns_replies_in_site_order(arrival):
    sites = {300: "site-01", 120: "site-03", 210: "site-02"}
    grid = arrival_grid(
        {node: (named_site(s), make_context({}, {}, node_id=node)) for node, s in sites.items()}, arrival
    )
    messenger = Messenger(grid, timeout=5.0)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query", group_id="1") for n in (120, 210, 300)]
    replies = messenger.exchange("count labels", messages, {"round": 1, "failures": []})
    assert [messenger.site_of(r) for r in replies] == ["site-01", "site-02", "site-03"]


def test_float_sum_order_matters():
    """Why the order is fixed: the same three updates summed in two orders differ in their bits."""
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(10_000).astype(np.float32) * w for w in (1.0, 1e-3, 1e3)]
    assert not np.array_equal(updates[0] + updates[1] + updates[2], updates[2] + updates[1] + updates[0])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reply-order") / "data"
    return write_prepared_sites(root, 3, tiny_run_config(root, root.parent / "runs"), seed_offset=5)


def test_global_model_is_the_same_whatever_the_arrival_order(data_root, tmp_path):
    """One stage-1 round, 2 local steps at 3 sites: replies arriving in two different orders give the
    same global model, bit for bit."""
    states = []
    for arrival in ((300, 120, 210), (210, 120, 300)):
        out = tmp_path / "-".join(map(str, arrival))
        rc = tiny_run_config(data_root, out, **{"rounds.stage2": 0, "train.local-steps": 2})
        nodes = {
            node: (client_app, make_context({"partition-id": p}, rc, node_id=node))
            for p, node in NODE_OF_PARTITION.items()
        }
        history = run_federation(arrival_grid(nodes, arrival), rc)
        assert len(history.rounds[0]["train"]["sites"]) == 3, history.rounds[0]["failures"]
        states.append(load_checkpoint(out / "run" / "global.pt").state_dict)
    a, b = states
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
