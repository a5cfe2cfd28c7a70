"""The ServerApp driven in-process: a FakeGrid hands its messages to the real ClientApp handlers.

Covers the stage schedule (only the trained half crosses), the counts round and global pos-weight,
a checkpoint per round, resume, sites failing or going silent mid-run, and a record of every message
both ways showing that only model arrays, label counts and metrics cross (and the validation sums, masked,
with the secure sum's public keys: never a site's plain sums).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord

from client.client_app import app as client_app
from common.checkpoint import build_from_checkpoint, load_checkpoint
from common.losses import pos_weight_from_counts
from common.model import build_joint_model
from common.records import (
    ARRAYS,
    CONFIG,
    FROZEN_UNET,
    LABEL_NEG,
    LABEL_POS,
    MASKED_VALIDATION,
    METRICS,
    PEER_KEYS,
    PEER_NODES,
    POS_WEIGHT,
    PUBLIC_KEY,
    SECURE,
    SECURE_PHASE,
    SERVER_ROUND,
    SITE_ID,
    STAGE,
)
from common.run_config import model_from_run_config
from common.secure_validation import vector_length
from server.checkpoints import round_checkpoints
from server.federation import run_federation
from tests.helpers.data import PHI
from tests.helpers.flower import FakeGrid, make_context, run_config, set_task_identity, write_prepared_sites

N_SITES = 3
IMAGE = 32
SOURCE = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "data"
    return write_prepared_sites(root, N_SITES, config(root, root.parent / "runs"), source=SOURCE)


def config(data_root: Path, out: Path, **overrides) -> dict:
    return run_config(
        **{
            "data.root": str(data_root),
            "output.dir": str(out),
            "output.name": "run",
            "model.image-size": IMAGE,
            "train.local-steps": 1,
            "train.batch-size": 4,
            "rounds.stage1": 2,
            "rounds.stage2": 2,
            **overrides,
        }
    )


def make_grid(rc: dict) -> FakeGrid:
    return FakeGrid(
        {
            100 + i: (client_app, make_context({"partition-id": i, "num-partitions": N_SITES}, rc, node_id=100 + i))
            for i in range(N_SITES)
        }
    )


@pytest.fixture(scope="module")
def fedavg_run(data_root, tmp_path_factory):
    """One 2 + 2 round run with the imbalance-aware head; its grid keeps every message."""
    set_task_identity()
    out = tmp_path_factory.mktemp("runs")
    rc = config(data_root, out, **{"strategy.imbalance-head": True})
    grid = make_grid(rc)
    warnings = WarningRecorder()
    logging.getLogger("flwr").addHandler(warnings)
    try:
        history = run_federation(grid, rc)
    finally:
        logging.getLogger("flwr").removeHandler(warnings)
    return {"grid": grid, "history": history, "out": out / "run", "rc": rc, "warnings": warnings.lines}


class WarningRecorder(logging.Handler):
    """The server's WARNING lines of one run (the module-scoped run cannot use caplog)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_deliveries(grid: FakeGrid, server_round: int):
    return [
        s
        for s in grid.log
        if s.message.metadata.message_type == MessageType.TRAIN
        and s.message.content[CONFIG][SERVER_ROUND] == server_round
    ]


def is_scoring(msg) -> bool:
    """An evaluate message that scores the model (not a step of the secure validation sum)."""
    return msg.metadata.message_type == MessageType.EVALUATE and SECURE_PHASE not in msg.content[CONFIG]


def test_each_stage_exchanges_only_its_half(fedavg_run):
    grid = fedavg_run["grid"]
    for rnd, prefix in ((1, "unet."), (2, "unet."), (3, "classifier."), (4, "classifier.")):
        sent = train_deliveries(grid, rnd)
        assert len(sent) == N_SITES
        for s in sent:
            assert s.message.content[CONFIG][STAGE] == (1 if prefix == "unet." else 2)
            assert all(k.startswith(prefix) for k in s.message.content[ARRAYS])
            assert all(k.startswith(prefix) for k in s.reply.content[ARRAYS])
    evaluations = [s for s in grid.log if is_scoring(s.message)]
    assert len(evaluations) == 4 * N_SITES
    for s in evaluations:
        prefix = "unet." if s.message.content[CONFIG][STAGE] == 1 else "classifier."
        assert all(k.startswith(prefix) for k in s.message.content[ARRAYS])


def test_frozen_unet_sent_once_per_site(fedavg_run):
    grid = fedavg_run["grid"]
    with_unet = [s for s in grid.log if FROZEN_UNET in s.message.content]
    assert sorted(s.message.metadata.dst_node_id for s in with_unet) == [100 + i for i in range(N_SITES)]
    assert all(
        s.message.content[CONFIG][SERVER_ROUND] == 3 and s.message.metadata.message_type == MessageType.TRAIN
        for s in with_unet
    )


def test_counts_round_gives_the_global_pos_weight(fedavg_run):
    grid = fedavg_run["grid"]
    queries = [s for s in grid.log if s.message.metadata.message_type == MessageType.QUERY]
    assert len(queries) == N_SITES
    first_stage2 = grid.log.index(train_deliveries(grid, 3)[0])
    assert all(grid.log.index(q) < first_stage2 for q in queries)
    pos = np.sum([q.reply.content[METRICS][LABEL_POS] for q in queries], axis=0)
    neg = np.sum([q.reply.content[METRICS][LABEL_NEG] for q in queries], axis=0)
    expected = pos_weight_from_counts(pos, neg).tolist()
    for rnd in (3, 4):
        for s in train_deliveries(grid, rnd):
            assert s.message.content[CONFIG][POS_WEIGHT] == pytest.approx(expected)
    for rnd in (1, 2):
        assert all(POS_WEIGHT not in s.message.content[CONFIG] for s in train_deliveries(grid, rnd))
    entry = fedavg_run["history"].rounds[2]
    assert entry["label-counts"]["pos"] == pos.tolist()


def test_checkpoint_every_round_loadable(fedavg_run):
    out, rc = fedavg_run["out"], fedavg_run["rc"]
    paths = round_checkpoints(out)
    assert [p.name for p in paths] == [f"round-{r:03d}.pt" for r in range(1, 5)]
    states = [load_checkpoint(p) for p in paths]
    assert [c.meta["round"] for c in states] == [1, 2, 3, 4] and [c.meta["stage"] for c in states] == [1, 1, 2, 2]
    init = build_joint_model(model_from_run_config(rc)[0], seed=int(rc["seed"])).state_dict()

    def changed(a, b, half: str) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(half) and a[k].is_floating_point())

    assert changed(states[0].state_dict, init, "unet.") and changed(states[1].state_dict, states[0].state_dict, "unet.")
    assert not changed(states[1].state_dict, init, "classifier.")  # stage 1 leaves the classifier alone
    assert not changed(states[3].state_dict, states[1].state_dict, "unet.")  # stage 2 leaves the U-Net alone
    assert changed(states[3].state_dict, states[2].state_dict, "classifier.")
    build_from_checkpoint(load_checkpoint(out / "global.pt"))  # what `hemexp predict` loads


def test_history_per_site_and_aggregated(fedavg_run):
    out = fedavg_run["out"]
    data = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4]
    for r in data["rounds"]:
        assert sorted(r["evaluate"]["sites"]) == ["site-01", "site-02", "site-03"]
        assert sorted(r["train"]["sites"]) == ["site-01", "site-02", "site-03"]
        assert "dice" in r["evaluate"]["aggregated"] and r["failures"] == []
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {"all", "site-01"} <= {row["site"] for row in rows}
    dice = [row for row in rows if row["round"] == "2" and row["phase"] == "evaluate" and row["metric"] == "dice"]
    per_site = {row["site"]: float(row["value"]) for row in dice}
    weights = {s: data["rounds"][1]["evaluate"]["sites"][s]["num-examples"] for s in per_site if s != "all"}
    assert per_site["all"] == pytest.approx(np.average([per_site[s] for s in weights], weights=list(weights.values())))


def test_only_arrays_counts_and_metrics_cross(fedavg_run, data_root):
    """Every message both ways: model arrays (no image-shaped, no uint8), counts, scalars; no identifier."""
    grid = fedavg_run["grid"]
    model_cfg = model_from_run_config(fedavg_run["rc"])[0]
    model_keys, n_outputs = set(build_joint_model(model_cfg).state_dict()), len(model_cfg.output_names)
    identifiers = (
        [f"P{i:03d}" for i in range(5)]
        + [f"S{i:03d}" for i in range(5)]
        + list(PHI.values())
        + ["DOE^PATIENT", str(data_root)]
    )
    texts = []
    for sent in grid.log:
        for msg in (sent.message, sent.reply):
            if msg.has_error():
                texts.append(msg.error.reason or "")
                continue
            for name, record in msg.content.items():
                if isinstance(record, ArrayRecord) and MASKED_VALIDATION in record:  # the masked validation sums
                    assert set(record) == {MASKED_VALIDATION} and record[MASKED_VALIDATION].dtype == "uint32"
                    assert tuple(record[MASKED_VALIDATION].shape) == (vector_length(n_outputs),)
                elif isinstance(record, ArrayRecord):
                    assert set(record) <= model_keys, name
                    for key, arr in record.items():
                        assert arr.dtype in ("float32", "int64"), key
                        assert tuple(arr.shape[-2:]) not in ((IMAGE, IMAGE), (SOURCE, SOURCE)), key
                elif isinstance(record, MetricRecord):
                    for key, value in record.items():
                        assert not key.startswith("val/"), key  # validation sums leave a site only masked
                        assert isinstance(value, (int, float)) or all(isinstance(v, int) for v in value), key
                    texts.append(repr(dict(record)))
                elif name == SECURE:  # secure validation sum: X25519 public keys and the session's node ids
                    assert set(record) <= {PUBLIC_KEY, PEER_NODES, PEER_KEYS}, name
                    keys = [record[PUBLIC_KEY]] if PUBLIC_KEY in record else list(record[PEER_KEYS])
                    assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)
                elif isinstance(record, ConfigRecord):
                    for key, value in record.items():
                        assert not isinstance(value, (bytes, list)) or all(isinstance(v, float) for v in value), key
                        if isinstance(value, str):
                            assert re.fullmatch(
                                r"site-\d\d|run|[0-9a-f]{32}|validation-\d+-\d+|validation-(mask|keys)", value
                            ), (key, value)
                    texts.append(repr(dict(record)))
                else:
                    pytest.fail(f"unexpected record {name}: {type(record).__name__}")
    blob = "\n".join(texts)
    for ident in identifiers:
        assert ident not in blob, ident
    sites = {s.reply.content["site"][SITE_ID] for s in grid.log if s.reply is not None and not s.reply.has_error()}
    assert sites == {"site-01", "site-02", "site-03"}


def test_site_failing_or_silent_mid_run(data_root, tmp_path):
    """site-02 raises in round 2, site-03 stops answering in round 3: the run still finishes."""
    rc = config(data_root, tmp_path, **{"rounds.stage2": 1, "rounds.timeout": 0.5})
    grid = make_grid(rc)

    def sabotage(msg):
        rnd = msg.content[CONFIG][SERVER_ROUND] if CONFIG in msg.content else 0
        if msg.metadata.dst_node_id == 101 and rnd == 2:
            grid.nodes[101][1].node_config["partition-id"] = 99  # its data is gone
        if msg.metadata.dst_node_id == 101 and rnd == 3:
            grid.nodes[101][1].node_config["partition-id"] = 1  # back again
        if rnd >= 3:
            grid.silent.add(102)

    grid.before_delivery = sabotage
    history = run_federation(grid, rc)
    assert [r["round"] for r in history.rounds] == [1, 2, 3]
    failures = {(r["round"], p, f["site"]) for r in history.rounds for f in r["failures"] for p in f["phases"]}
    assert (2, "train", "site-02") in failures and (2, "evaluate", "site-02") in failures
    assert {(3, "count labels", "site-03"), (3, "train", "site-03"), (3, "evaluate", "site-03")} <= failures
    # one entry per site and round, with the first phase's reason
    assert [(f["site"], f["phase"]) for f in history.rounds[2]["failures"]] == [("site-03", "count labels")]
    reasons = [f["reason"] for r in history.rounds for f in r["failures"]]
    assert any("partition 99 has no site" in r for r in reasons) and any("no reply" in r for r in reasons)
    assert sorted(history.rounds[1]["train"]["sites"]) == ["site-01", "site-03"]
    assert sorted(history.rounds[2]["train"]["sites"]) == ["site-01", "site-02"]
    assert len(round_checkpoints(tmp_path / "run")) == 3


def test_eval_test_rounds_last_skips_the_other_evaluations(data_root, tmp_path):
    """With ``eval.test-rounds = last`` no site scores a stage-1 round of a two-stage run (none can be
    chosen), every stage-2 round is still scored (validation chooses among them), and the history
    and checkpoints of the skipped rounds say so (no test metrics, no calibration)."""
    rc = config(data_root, tmp_path, **{"eval.test-rounds": "last"})
    grid = make_grid(rc)
    history = run_federation(grid, rc)
    scored = [s.message.content[CONFIG][SERVER_ROUND] for s in grid.log if is_scoring(s.message)]
    assert sorted(set(scored)) == [3, 4] and len(scored) == 2 * N_SITES
    assert [bool(r["evaluate"]) for r in history.rounds] == [False, False, True, True]
    metas = [load_checkpoint(p).meta for p in round_checkpoints(tmp_path / "run")]
    assert ["thresholds" in m for m in metas] == [False, False, True, True]


def test_accept_failures_false_keeps_the_previous_model(data_root, tmp_path):
    rc = config(data_root, tmp_path, **{"strategy.accept-failures": False, "rounds.stage2": 0, "rounds.timeout": 0.5})
    grid = make_grid(rc)
    grid.before_delivery = lambda msg: grid.silent.add(102) if msg.content[CONFIG][SERVER_ROUND] == 2 else None
    history = run_federation(grid, rc)
    assert history.rounds[1].get("skipped") is True
    r1, r2 = (load_checkpoint(p).state_dict for p in round_checkpoints(tmp_path / "run"))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_resume_continues_after_the_last_checkpoint(data_root, tmp_path):
    first = config(data_root, tmp_path, **{"rounds.stage1": 1, "rounds.stage2": 1})
    run_federation(make_grid(first), first)
    with pytest.raises(FileExistsError, match="resume"):
        run_federation(make_grid(first), first)
    more = config(data_root, tmp_path, **{"rounds.stage1": 1, "rounds.stage2": 2, "resume": True})
    grid = make_grid(more)
    history = run_federation(grid, more)
    sent_rounds = {s.message.content[CONFIG][SERVER_ROUND] for s in grid.log}
    assert sent_rounds == {3}
    assert [r["round"] for r in history.rounds] == [1, 2, 3]
    assert [p.name for p in round_checkpoints(tmp_path / "run")] == ["round-001.pt", "round-002.pt", "round-003.pt"]
    resumed_from = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-002.pt").state_dict
    final = load_checkpoint(tmp_path / "run" / "global.pt").state_dict
    assert all(torch.equal(resumed_from[k], final[k]) for k in final if k.startswith("unet."))


def test_best_checkpoint_is_the_best_validation_round(fedavg_run):
    """best.pt = the round with the best summed validation score (stage 2 beats stage 1), and every
    round checkpoint carries per-marker thresholds and temperatures chosen on validation."""
    out = fedavg_run["out"]
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    # the run has stage-2 rounds, so its stage-1 rounds are never chosen and never scored on validation
    # (the sites send no sums for them, and the server does not ask: no "unusable" warning)
    assert not [w for w in fedavg_run["warnings"] if "validation sums" in w]
    assert {r["stage"] for r in rounds} == {1, 2}
    assert all(r["evaluate"]["validation"] == {} for r in rounds if r["stage"] == 1)
    stage2 = [r for r in rounds if r["stage"] == 2]
    assert all(r["evaluate"]["validation"]["sites"] == N_SITES for r in stage2)
    scored = [(r["stage"], r["evaluate"]["validation"]["score"], r["round"]) for r in stage2]
    usable = [s for s in scored if s[1] is not None and not np.isnan(s[1])]
    expected = max(usable, key=lambda s: (s[0], s[1], -s[2]))[2]
    best = load_checkpoint(out / "best.pt")
    assert best.meta["round"] == expected
    labels = list(best.labels)
    for p in round_checkpoints(out):
        meta = load_checkpoint(p).meta
        if meta["stage"] == 1:
            assert "thresholds" not in meta
            continue
        assert sorted(meta["thresholds"]) == sorted(labels) == sorted(meta["temperature"])
        assert all(0 < v < 1 for v in meta["thresholds"].values())
        assert all(v > 0 for v in meta["temperature"].values())
    # The history keeps scalars only: the sums stay out of it.
    assert not any(isinstance(v, list) for r in rounds for s in r["evaluate"]["sites"].values() for v in s.values())
