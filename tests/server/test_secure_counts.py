"""``privacy.secure-counts`` end to end in-process: the ServerApp and the real ClientApp handlers on a
FakeGrid. The server's totals equal the plain sum computed independently from each site's cache;
no message the server receives holds any site's own counts; a site lost between the key exchange
and the masked counts makes the server start again with the others; conflicting options fail early.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from client.client_app import app as client_app
from client.federation.errors import SiteError
from client.federation.node import SiteNode, partition_site
from client.federation.site_data import open_site, site_label_counts
from client.federation.site_run import SiteRunConfig
from common.records import (
    CONFIG,
    LABEL_NEG,
    LABEL_POS,
    MASKED_COUNTS,
    METRICS,
    PEER_KEYS,
    PEER_NODES,
    POS_WEIGHT,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
)
from common.secure_sum import MODULUS
from server.federation import run_federation
from server.server_config import ServerRunConfig
from tests.helpers.flower import (
    FakeGrid,
    make_context,
    make_message,
    set_task_identity,
    tiny_run_config,
    write_prepared_sites,
)

N_SITES = 3
NODES = [2**63 + 11, 40, 2**40 + 3]  # Flower node ids are random 64-bit integers; not in site order


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secure") / "data"
    return write_prepared_sites(root, N_SITES, config(root, root.parent / "runs"), seed_offset=1)


def config(data_root: Path, out: Path, **overrides) -> dict:
    return tiny_run_config(
        data_root,
        out,
        **{"rounds.stage1": 0, "strategy.fraction-evaluate": 0.0, "privacy.secure-counts": True, **overrides},
    )


def make_grid(rc: dict) -> FakeGrid:
    return FakeGrid(
        {node: (client_app, make_context({"partition-id": i}, rc, node_id=node)) for i, node in enumerate(NODES)}
    )


def plain_counts(data_root: Path, rc: dict, partitions) -> tuple[list, list, list]:
    """Each site's (positives, negatives, training slices), read from its cache without any message."""
    run = SiteRunConfig.from_run_config(rc)
    out = []
    for i in partitions:
        data = open_site(SiteNode(partition_site(data_root, i), f"site-{i + 1:02d}", data_root / ".cache"), run)
        pos, neg = site_label_counts(data.train, run.model)
        out.append((pos, neg, len(data.train)))
    return out


def received(grid: FakeGrid):
    return [s.reply for s in grid.log if s.reply is not None]


def queries(grid: FakeGrid, phase: str):
    return [
        s
        for s in grid.log
        if s.message.metadata.message_type == MessageType.QUERY and s.message.content[CONFIG][SECURE_PHASE] == phase
    ]


@pytest.fixture(scope="module")
def secure_run(data_root, tmp_path_factory):
    set_task_identity()
    rc = config(data_root, tmp_path_factory.mktemp("runs"))
    grid = make_grid(rc)
    history = run_federation(grid, rc)
    return {"grid": grid, "history": history, "rc": rc}


def test_server_total_equals_the_plain_sum(secure_run, data_root):
    per_site = plain_counts(data_root, secure_run["rc"], range(N_SITES))
    pos = np.sum([p for p, _, _ in per_site], axis=0).tolist()
    neg = np.sum([n for _, n, _ in per_site], axis=0).tolist()
    assert sum(pos) > 0 and sum(neg) > 0  # the check means something
    counts = secure_run["history"].rounds[0]["label-counts"]
    assert counts["pos"] == pos and counts["neg"] == neg
    grid = secure_run["grid"]
    assert len(queries(grid, SECURE_KEYS)) == N_SITES and len(queries(grid, SECURE_MASK)) == N_SITES
    for s in grid.log:
        if s.message.metadata.message_type == MessageType.TRAIN:
            assert POS_WEIGHT in s.message.content[CONFIG]


def test_no_site_counts_reach_the_server(secure_run, data_root):
    grid = secure_run["grid"]
    per_site = plain_counts(data_root, secure_run["rc"], range(N_SITES))
    own = {tuple(v) for p, n, _ in per_site for v in (p, n)}
    replies = received(grid)
    assert replies and not any(r.has_error() for r in replies)
    for reply in replies:
        for name, record in reply.content.items():
            if isinstance(record, MetricRecord):
                assert LABEL_POS not in record and LABEL_NEG not in record, name
                for key, value in record.items():
                    if isinstance(value, list):
                        assert key == MASKED_COUNTS and tuple(value) not in own
                        assert all(0 <= v < MODULUS for v in value)
    masked = {
        r.metadata.src_node_id: r.content[METRICS][MASKED_COUNTS]
        for r in replies
        if MASKED_COUNTS in r.content[METRICS]
    }
    assert sorted(masked) == sorted(NODES)
    for node, (pos, neg, slices) in zip(NODES, per_site):  # NODES[i] holds partition i
        assert not any(
            a == b for a, b in zip(masked[node], pos + neg + [slices]) if b
        )  # no nonzero count shows through
    # the train replies carry no counts either, and the round still aggregated
    train = [s.reply for s in grid.log if s.message.metadata.message_type == MessageType.TRAIN]
    assert len(train) == N_SITES and all(LABEL_POS not in r.content[METRICS] for r in train)
    assert not secure_run["history"].rounds[0].get("skipped")


def test_dropout_between_the_steps_restarts(data_root, tmp_path, caplog):
    """site-02 answers the key exchange, then vanishes: the masks cannot cancel; the server starts
    again with site-01 and site-03 and gets their exact total."""
    rc = config(data_root, tmp_path, **{"rounds.timeout": 0.3})
    grid = make_grid(rc)

    def vanish(msg):
        cfg = msg.content[CONFIG] if CONFIG in msg.content else {}
        if cfg.get(SECURE_PHASE) == SECURE_MASK and msg.metadata.dst_node_id == NODES[1]:
            grid.silent.add(NODES[1])

    grid.before_delivery = vanish
    with caplog.at_level(logging.WARNING, logger="flwr"):
        history = run_federation(grid, rc)
    per_site = plain_counts(data_root, rc, (0, 2))
    counts = history.rounds[0]["label-counts"]
    assert counts["pos"] == np.sum([p for p, _, _ in per_site], axis=0).tolist()
    assert counts["neg"] == np.sum([n for _, n, _ in per_site], axis=0).tolist()
    sessions = [s.message.content[CONFIG][SECURE_SESSION] for s in queries(grid, SECURE_MASK)]
    assert sorted(set(sessions)) == ["counts-1-1", "counts-1-2"]
    assert sorted(
        s.message.metadata.dst_node_id
        for s in queries(grid, SECURE_KEYS)
        if s.message.content[CONFIG][SECURE_SESSION] == "counts-1-2"
    ) == sorted([NODES[0], NODES[2]])
    assert any(
        "site-02" in r.getMessage() and "do not cancel" in r.getMessage() and "Restarting" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert {"phase": "secure counts: masked counts", "site": "site-02"}.items() <= history.rounds[0]["failures"][
        0
    ].items()


def test_repeated_dropouts_give_up_without_counts(data_root, tmp_path, caplog):
    """A site lost in every session: after too few sites remain the round runs with unweighted BCE."""
    rc = config(data_root, tmp_path, **{"rounds.timeout": 0.3, "strategy.min-train-nodes": 1})
    grid = make_grid(rc)

    def vanish(msg):
        cfg = msg.content[CONFIG] if CONFIG in msg.content else {}
        if cfg.get(SECURE_PHASE) == SECURE_MASK:
            alive = [n for n in NODES if n not in grid.silent]
            if msg.metadata.dst_node_id == alive[0]:
                grid.silent.add(alive[0])

    grid.before_delivery = vanish
    with caplog.at_level(logging.WARNING, logger="flwr"):
        history = run_federation(grid, rc)
    assert "label-counts" not in history.rounds[0]
    assert all(
        POS_WEIGHT not in s.message.content[CONFIG]
        for s in grid.log
        if s.message.metadata.message_type == MessageType.TRAIN
    )
    assert any("needed" in r.getMessage() for r in caplog.records)


def test_imbalance_head_with_secure_counts_refused(data_root, tmp_path):
    rc = config(data_root, tmp_path, **{"strategy.imbalance-head": True})
    with pytest.raises(
        ValueError, match=r"strategy.imbalance-head .* privacy.secure-counts .* switch one of the two off"
    ):
        ServerRunConfig.from_run_config(rc)
    assert ServerRunConfig.from_run_config(config(data_root, tmp_path)).secure_counts is True
    assert (
        ServerRunConfig.from_run_config(config(data_root, tmp_path, **{"privacy.secure-counts": False})).secure_counts
        is False
    )


# --- the site's side, called directly -------------------------------------------------------------


def _ask(rc: dict, node: int, config_values: dict, context=None, secure: RecordDict | None = None):
    content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1, **config_values})})
    if secure is not None:
        content[SECURE] = secure
    context = context or make_context({"partition-id": 0}, rc, node_id=node)
    return client_app(make_message(content, MessageType.QUERY, dst_node_id=node), context), context


def test_site_refuses_plain_counts_when_secure(data_root, tmp_path):
    rc = config(data_root, tmp_path)
    with pytest.raises(SiteError, match="only masked"):
        _ask(rc, 5, {})
    with pytest.raises(SiteError, match="privacy.secure-counts is off"):
        _ask(
            config(data_root, tmp_path, **{"privacy.secure-counts": False}),
            5,
            {SECURE_PHASE: SECURE_KEYS, SECURE_SESSION: "s"},
        )


def test_site_masks_once_and_never_alone(data_root, tmp_path):
    rc = config(data_root, tmp_path)
    reply, ctx = _ask(rc, 5, {SECURE_PHASE: SECURE_KEYS, SECURE_SESSION: "s"})
    own = reply.content[SECURE]["public-key"]
    alone = ConfigRecord({PEER_NODES: [5], PEER_KEYS: [own]})
    with pytest.raises(SiteError, match="at least one other site"):
        _ask(rc, 5, {SECURE_PHASE: SECURE_MASK, SECURE_SESSION: "s"}, ctx, alone)
    # the key was used (and dropped) by that refused attempt: no second try in the same session
    with pytest.raises(SiteError, match="no key for this secure counts session"):
        _ask(rc, 5, {SECURE_PHASE: SECURE_MASK, SECURE_SESSION: "s"}, ctx, alone)
