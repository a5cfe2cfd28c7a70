"""The secure validation sum end to end in-process: the ServerApp and the real ClientApp handlers on a
FakeGrid. Model selection is unchanged: each round's score, temperatures, thresholds and best.pt are
those the plain totals of the sums every site held give; no message the server receives holds one
site's sums; a site lost before its masked step makes the server start again with the others (without
scoring again); one site alone is never "summed".
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import client.client_app as client_app_module
from client.client_app import app as client_app
from common.checkpoint import load_checkpoint
from common.config import LABELS
from common.records import (
    ARRAYS,
    CONFIG,
    MASKED_VALIDATION,
    METRICS,
    PEER_KEYS,
    PEER_NODES,
    PUBLIC_KEY,
    SECURE,
    SECURE_PHASE,
    SECURE_SESSION,
    SERVER_ROUND,
    VALIDATION_KEYS,
    VALIDATION_MASK,
)
from common.run_config import model_from_run_config
from common.secure_validation import nll_tolerance, vector_length
from common.validation import calibration_meta, selection_score
from server.checkpoints import round_checkpoints
from server.federation import run_federation
from server.secure_validation import secure_validation_sum
from tests.helpers.flower import FakeGrid, make_context, set_task_identity, tiny_run_config, write_prepared_sites

NODES = [2**63 + 11, 40, 2**40 + 3]  # Flower node ids are random 64-bit integers; not in site order

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secure_validation") / "data"
    return write_prepared_sites(root, len(NODES), config(root, root.parent / "runs"), seed_offset=2)


def config(data_root: Path, out: Path, **overrides) -> dict:
    return tiny_run_config(data_root, out, **{"rounds.stage1": 0, "rounds.stage2": 2, **overrides})


def make_grid(rc: dict) -> FakeGrid:
    return FakeGrid(
        {node: (client_app, make_context({"partition-id": i}, rc, node_id=node)) for i, node in enumerate(NODES)}
    )


def record_held(monkeypatch) -> dict[int, dict[int, object]]:
    """round -> node -> the plain sums the site held (and sent only masked): the independent reference."""
    held: dict[int, dict[int, object]] = {}
    original = client_app_module.hold_validation

    def spy(context, stats, server_round, session):
        held.setdefault(int(server_round), {})[int(context.node_id)] = stats
        return original(context, stats, server_round, session)

    monkeypatch.setattr(client_app_module, "hold_validation", spy)
    return held


def plain_total(held: dict[int, object], nodes: list[int]):
    """The old server's total: the sites' plain sums added in site order (partition i is site i + 1)."""
    parts = [held[n] for n in sorted(nodes, key=NODES.index)]
    return sum(parts[1:], parts[0])


def steps(grid: FakeGrid, phase: str):
    return [
        s
        for s in grid.log
        if s.message.metadata.message_type == MessageType.EVALUATE
        and s.message.content[CONFIG].get(SECURE_PHASE) == phase
    ]


@pytest.fixture(scope="module")
def secure_run(data_root, tmp_path_factory):
    set_task_identity()
    monkeypatch = pytest.MonkeyPatch()
    held = record_held(monkeypatch)
    rc = config(data_root, tmp_path_factory.mktemp("runs"))
    grid = make_grid(rc)
    try:
        history = run_federation(grid, rc)
    finally:
        monkeypatch.undo()
    return {"grid": grid, "history": history, "rc": rc, "held": held, "out": Path(rc["output.dir"]) / "run"}


def test_selection_equals_the_plain_totals(secure_run):
    """Per round: the score, temperatures and thresholds in the checkpoint are those of the plain totals;
    best.pt is the round the plain scores choose."""
    held, rc = secure_run["held"], secure_run["rc"]
    names = list(model_from_run_config(rc)[0].output_names)
    markers = [c for c, n in enumerate(names) if n != LABELS[-1]]
    assert sorted(held) == [1, 2] and all(sorted(h) == sorted(NODES) for h in held.values())
    scores = {}
    for path in round_checkpoints(secure_run["out"]):
        meta = load_checkpoint(path).meta
        plain = plain_total(held[meta["round"]], NODES)
        assert plain.pos_hist.sum() + plain.neg_hist.sum() > 0  # the check means something
        expected = calibration_meta(plain, names, float(rc["eval.target-sensitivity"]))
        assert meta["temperature"] == expected["temperature"] and meta["thresholds"] == expected["thresholds"]
        score = selection_score(plain, 2, markers)
        assert meta["validation"]["score"] == pytest.approx(score, abs=0) or np.isnan(score)
        assert meta["validation"]["sites"] == len(NODES) and meta["validation"]["dice"] == plain.dice()
        scores[meta["round"]] = score
    usable = {r: s for r, s in scores.items() if not np.isnan(s)}
    if usable:
        best = max(usable, key=lambda r: (usable[r], -r))
        assert load_checkpoint(secure_run["out"] / "best.pt").meta["round"] == best


def test_no_site_sums_reach_the_server(secure_run):
    grid = secure_run["grid"]
    length = vector_length(len(model_from_run_config(secure_run["rc"])[0].output_names))
    evaluate = [s for s in grid.log if s.message.metadata.message_type == MessageType.EVALUATE]
    assert evaluate and all(s.reply is not None and not s.reply.has_error() for s in evaluate)
    for s in evaluate:
        content = s.reply.content
        assert not any(k.startswith("val/") for k in content[METRICS])
        assert not any(isinstance(v, list) for v in content[METRICS].values())
        phase = s.message.content[CONFIG].get(SECURE_PHASE)
        if phase == VALIDATION_MASK:
            assert set(content) == {ARRAYS, METRICS, "site"} and not dict(content[METRICS])
            (key, array), *_ = content[ARRAYS].items()
            assert key == MASKED_VALIDATION and array.dtype == "uint32" and tuple(array.shape) == (length,)
        else:  # the evaluate reply: scalars and the public key only
            assert set(content[SECURE]) == {PUBLIC_KEY} and len(content[SECURE][PUBLIC_KEY]) == 32
            assert (
                s.message.content[CONFIG][SECURE_SESSION] == f"validation-{s.message.content[CONFIG][SERVER_ROUND]}-1"
            )
    masks = steps(grid, VALIDATION_MASK)
    assert len(masks) == 2 * len(NODES) and not steps(grid, VALIDATION_KEYS)  # no extra key exchange
    for s in masks:
        assert sorted(s.message.content[SECURE][PEER_NODES]) == sorted(NODES)
        assert len(set(s.message.content[SECURE][PEER_KEYS])) == len(NODES)


def test_dropout_before_the_masked_step_restarts_without_scoring_again(data_root, tmp_path, monkeypatch, caplog):
    """site-02 replies to evaluate (its key), then vanishes: the server starts again with site-01 and site-03
    (fresh keys on the sums they hold) and gets exactly their total; nobody scores again."""
    held = record_held(monkeypatch)
    rc = config(data_root, tmp_path, **{"rounds.stage2": 1, "rounds.timeout": 0.3})
    grid = make_grid(rc)

    def vanish(msg):
        cfg = msg.content[CONFIG] if CONFIG in msg.content else {}
        if cfg.get(SECURE_PHASE) == VALIDATION_MASK and msg.metadata.dst_node_id == NODES[1]:
            grid.silent.add(NODES[1])

    grid.before_delivery = vanish
    with caplog.at_level(logging.WARNING, logger="flwr"):
        history = run_federation(grid, rc)
    names = list(model_from_run_config(rc)[0].output_names)
    plain = plain_total(held[1], [NODES[0], NODES[2]])
    meta = load_checkpoint(round_checkpoints(tmp_path / "run")[0]).meta
    assert meta["validation"]["sites"] == 2
    assert meta["temperature"] == calibration_meta(plain, names, float(rc["eval.target-sensitivity"]))["temperature"]
    sessions = [s.message.content[CONFIG][SECURE_SESSION] for s in steps(grid, VALIDATION_MASK)]
    assert sorted(set(sessions)) == ["validation-1-1", "validation-1-2"]
    assert sorted(s.message.metadata.dst_node_id for s in steps(grid, VALIDATION_KEYS)) == sorted([NODES[0], NODES[2]])
    assert len(held[1]) == len(NODES)  # each site scored once
    assert any("site-02" in r.getMessage() and "Restarting" in r.getMessage() for r in caplog.records)
    assert history.rounds[0]["failures"][0]["site"] == "site-02"


def test_one_site_alone_is_never_summed(caplog):
    """A "sum" over one site is its own sums: the server sends it no masked step and chooses nothing."""
    sent: list[Message] = []

    def exchange(phase: str, msgs: list[Message]) -> list[Message]:
        sent.extend(msgs)
        return []

    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert secure_validation_sum({5: b"k" * 32}, exchange, 4, 5) is None
    assert not sent and any("cannot be chosen" in r.getMessage() for r in caplog.records)


def test_a_malformed_masked_vector_counts_as_lost(caplog):
    """A site whose masked vector is not a uint32 vector of the right length is treated as lost; with the
    other two the second session succeeds, and its totals are what the two sent (all-zero sums here)."""
    n_cols, length = 5, vector_length(5)

    def exchange(phase: str, msgs: list[Message]) -> list[Message]:
        replies = []
        for m in msgs:
            node, config = m.metadata.dst_node_id, m.content[CONFIG]
            if config[SECURE_PHASE] == VALIDATION_KEYS:
                content = RecordDict({METRICS: MetricRecord(), SECURE: ConfigRecord({PUBLIC_KEY: bytes([node]) * 32})})
            else:
                bad = node == 2 and config[SECURE_SESSION].endswith("-1")
                words = np.zeros(length - 1 if bad else length, dtype=np.uint32)
                content = RecordDict({METRICS: MetricRecord(), ARRAYS: ArrayRecord({MASKED_VALIDATION: Array(words)})})
            replies.append(Message(content, reply_to=m))  # from the node the step was sent to
        return replies

    with caplog.at_level(logging.WARNING, logger="flwr"):
        summed = secure_validation_sum({n: bytes([n]) * 32 for n in (1, 2, 3)}, exchange, 4, n_cols)
    assert summed is not None and summed[1] == 2 and summed[0].pos_hist.sum() == 0
    assert np.allclose(summed[0].temperature_nll, 0, atol=nll_tolerance(2))
    assert any("malformed" in r.getMessage() for r in caplog.records)
