"""Fuzzing the server's reply handling (hypothesis): one site answers every message with a generated
malformed reply (missing or extra records, keys, arrays; wrong shapes, dtypes, record kinds or
message type; NaN, infinite, negative, fractional or huge values; an empty or oversized reply) while
two honest sites answer correctly, through the in-process Grid.

For each example the server's train round (stage 1, or stage 2 with its counts round) or evaluate
round must not raise, must reject every malformed reply, log each rejection naming the site's node,
the rule and the key, keep no generated value in the history or the log, and aggregate exactly the
honest sites' replies. The number of malformed replies tried is printed (run with ``-s``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.model import half_state_dict
from common.records import ARRAYS, LABEL_NEG, LABEL_POS, METRICS, NUM_EXAMPLES, SITE, SITE_ID, STEPS, TRAIN_LOSS
from server.federation import Federation
from server.server_config import ServerRunConfig
from server.validation import MAX_COUNT, SITE_ID_PATTERN
from tests.helpers.flower import FakeGrid, make_context, run_config, set_task_identity

MAX_EXAMPLES = 50
HONEST = (100, 101)
FUZZ = 102
#: In every generated text: a stand-in for a patient name that must never reach a log or the history.
MARKER = "Doe^Jane"
DELTA = {100: 0.01, 101: 0.02}
EXAMPLES = {100: 20, 101: 30}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Draft:
    """A reply before it is built: records as plain dicts, so that mutations stay simple."""

    message_type: str
    records: dict[str, dict[str, Any]]
    kinds: dict[str, type] = field(default_factory=dict)
    request_type: str = ""

    def __post_init__(self) -> None:
        self.request_type = self.request_type or self.message_type

    def build(self, msg: Message) -> Message:
        content = RecordDict()
        for name, values in self.records.items():
            kind = self.kinds.get(name) or (
                ArrayRecord if name == ARRAYS else MetricRecord if name == METRICS else ConfigRecord
            )
            content[name] = (
                ArrayRecord({k: Array(v) for k, v in values.items()}) if kind is ArrayRecord else kind(values)
            )
        reply = Message(content, reply_to=msg)
        if self.message_type != reply.metadata.message_type:
            reply.metadata.message_type = self.message_type
        return reply


def honest_draft(msg: Message, node: int, n_labels: int) -> Draft:
    kind = msg.metadata.message_type
    site = {SITE_ID: f"site-{node}"}
    counts = {LABEL_POS: [1] * n_labels, LABEL_NEG: [2] * n_labels}
    if kind == MessageType.TRAIN:
        arrays = {k: a.numpy() for k, a in msg.content[ARRAYS].items()}
        arrays = {k: v + v.dtype.type(DELTA.get(node, 0.03)) if v.dtype.kind == "f" else v for k, v in arrays.items()}
        metrics = {NUM_EXAMPLES: EXAMPLES.get(node, 40), TRAIN_LOSS: 0.5, STEPS: 1, **counts}
        return Draft(kind, {ARRAYS: arrays, METRICS: metrics, SITE: site})
    if kind == MessageType.EVALUATE:
        return Draft(kind, {METRICS: {NUM_EXAMPLES: 10, "dice": 0.5, "n_slices": 10, "n_studies": 2}, SITE: site})
    return Draft(kind, {METRICS: {NUM_EXAMPLES: 100, **counts}, SITE: site})


# --- mutations: each one makes any reply of any phase malformed -----------------------------

texts = st.text(min_size=0, max_size=12).map(lambda t: f"x-{MARKER}{t}")
bad_ints = st.one_of(
    st.integers(max_value=-1, min_value=-(2**40)), st.integers(min_value=MAX_COUNT + 1, max_value=2**62)
)
bad_floats = st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (v >= 0 and float(v).is_integer()))
bad_counts = st.one_of(bad_ints, bad_floats)
#: A MetricRecord list holds ints only or floats only: a site cannot send a mixed one.
bad_count_lists = st.one_of(st.lists(bad_ints, min_size=1, max_size=6), st.lists(bad_floats, min_size=1, max_size=6))


def mutate(draft: Draft, name: str, data: st.DataObject) -> None:
    recs = draft.records
    if name == "empty":
        recs.clear()
    elif name == "drop-record":
        recs.pop(data.draw(st.sampled_from([METRICS, SITE])), None)
    elif name == "extra-record":
        recs[data.draw(texts)] = {"v": 1}
    elif name == "record-kind":
        draft.kinds[METRICS if METRICS in recs else SITE] = ConfigRecord if METRICS in recs else MetricRecord
        if SITE in recs and METRICS not in recs:
            recs[SITE] = {SITE_ID: 1}
    elif name == "message-type":
        others = [t for t in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY) if t != draft.request_type]
        draft.message_type = data.draw(st.sampled_from(others))
    elif name == "arrays":
        mutate_arrays(draft, data)
    elif name == "metric-extra":
        recs.setdefault(METRICS, {})[data.draw(texts)] = data.draw(st.floats(allow_nan=True))
    elif name == "metric-missing":
        recs.setdefault(METRICS, {}).pop(NUM_EXAMPLES, None)
    elif name == "metric-value":
        recs.setdefault(METRICS, {})[NUM_EXAMPLES] = data.draw(bad_counts)
    elif name == "label-counts":
        key = data.draw(st.sampled_from([LABEL_POS, LABEL_NEG]))
        recs.setdefault(METRICS, {})[key] = data.draw(bad_count_lists)
    elif name == "site-id":
        recs.setdefault(SITE, {})[SITE_ID] = data.draw(
            st.one_of(texts.filter(lambda t: not SITE_ID_PATTERN.fullmatch(t)), st.booleans(), st.binary(max_size=8))
        )
    elif name == "oversize":
        size = sum(a.nbytes for a in recs.get(ARRAYS, {}).values()) + (3 << 20)
        recs.setdefault(METRICS, {})[STEPS] = [1] * (size // 8)


def mutate_arrays(draft: Draft, data: st.DataObject) -> None:
    """Train: one array dropped, added, reshaped, retyped or poisoned; other phases: an ARRAYS record at all."""
    arrays = draft.records.get(ARRAYS)
    if draft.request_type != MessageType.TRAIN or not arrays:  # no arrays belong here, or all dropped already
        draft.records.setdefault(ARRAYS, {})[data.draw(texts)] = np.zeros(3, np.float32)
        return
    key = data.draw(st.sampled_from(sorted(arrays)))
    how = data.draw(st.sampled_from(["drop", "extra", "shape", "dtype", "nan"]))
    a = arrays[key]
    if how == "drop":
        del arrays[key]
    elif how == "extra":
        arrays[data.draw(texts)] = np.zeros(2, np.float32)
    elif how == "shape":
        arrays[key] = np.zeros(a.size + data.draw(st.integers(1, 5)), a.dtype)
    elif how == "dtype":
        arrays[key] = a.astype(
            data.draw(st.sampled_from([t for t in ("float64", "float16", "int32") if t != str(a.dtype)]))
        )
    else:
        bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        if a.dtype.kind == "f":
            arrays[key] = np.full_like(a, bad)
        else:  # an integer buffer cannot hold NaN: send it as floats instead
            arrays[key] = np.full(a.shape, bad, np.float32)


MUTATIONS = [
    "empty",
    "drop-record",
    "extra-record",
    "record-kind",
    "message-type",
    "arrays",
    "metric-extra",
    "metric-missing",
    "metric-value",
    "label-counts",
    "site-id",
    "oversize",
]


# --- the federation under test ---------------------------------------------------------------


@dataclass
class Sites:
    """The grid's three nodes: two honest, one answering with ``mutations`` applied to its honest reply."""

    n_labels: int
    mutations: list[str] = field(default_factory=list)
    data: Any = None
    tried: int = 0

    def app(self, node: int):
        def handle(msg: Message, context) -> Message:
            draft = honest_draft(msg, node, self.n_labels)
            if node == FUZZ:
                for name in self.mutations:
                    mutate(draft, name, self.data)
                self.tried += 1
            return draft.build(msg)

        return handle


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    set_task_identity()
    rc = run_config(
        **{
            "output.dir": str(tmp_path_factory.mktemp("fuzz")),
            "output.name": "run",
            "model.image-size": 32,
            "rounds.stage1": 1,
            "rounds.stage2": 1,
        }
    )
    cfg = ServerRunConfig.from_run_config(rc)
    sites = Sites(len(cfg.model.output_names))
    grid = FakeGrid({n: (sites.app(n), make_context({}, rc, node_id=n)) for n in (*HONEST, FUZZ)})
    return Federation(grid, cfg), sites


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_malformed_replies_are_rejected_logged_and_never_aggregated(federation):
    fed, sites = federation
    lines = Lines()
    logging.getLogger("flwr").addHandler(lines)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        phase=st.sampled_from(["train-1", "train-2", "evaluate"]),
        mutations=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
        data=st.data(),
    )
    def check(phase: str, mutations: list[str], data: st.DataObject) -> None:
        set_task_identity()
        sites.mutations, sites.data = mutations, data
        tried_before, lines.lines[:] = sites.tried, []
        fed.counts, fed.declared = None, {}
        entry: dict[str, Any] = {"round": 1, "stage": 1, "failures": [], "rejected": []}
        stage = 2 if phase == "train-2" else 1
        half = "unet" if stage == 1 else "classifier"
        before = {k: v.clone() for k, v in half_state_dict(fed.model, half).items()}
        if phase == "evaluate":
            out, _ = fed.evaluate_round(1, stage, entry)
            assert out["aggregated"]["dice"] == pytest.approx(0.5) and set(out["sites"]) == {"site-100", "site-101"}
        else:
            out = fed.train_round(1, stage, entry)
            assert set(out["sites"]) == {"site-100", "site-101"} and not entry.get("skipped")
            after = half_state_dict(fed.model, half)
            shift = sum(EXAMPLES[n] * DELTA[n] for n in HONEST) / sum(EXAMPLES.values())
            for k, v in before.items():
                expected = v + shift if v.is_floating_point() else v
                np.testing.assert_allclose(after[k].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        if phase == "train-2":  # the counts round: the honest sites' sums only
            assert [c.tolist() for c in fed.counts] == [[2] * sites.n_labels, [4] * sites.n_labels]
        sent = sites.tried - tried_before
        assert sent >= 1 and entry["failures"] == []
        assert [r["node"] for r in entry["rejected"]] == [FUZZ] * sent
        assert all(r["rule"] and r["key"] for r in entry["rejected"])
        rejections = [line for line in lines.lines if "reply rejected" in line]
        assert len(rejections) == sent and all(f"(node {FUZZ})" in line for line in rejections)
        assert MARKER not in json.dumps(entry, default=str) and not any(MARKER in line for line in lines.lines)

    try:
        check()
    finally:
        logging.getLogger("flwr").removeHandler(lines)
    print(f"\nfuzz: {sites.tried} malformed replies tried in {MAX_EXAMPLES} examples, all rejected")
    assert sites.tried >= MAX_EXAMPLES
