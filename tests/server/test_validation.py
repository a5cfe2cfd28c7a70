"""server.validation: each rule rejects what it should, by rule and key, and lets an honest reply through;
the num-examples bound against an independent computation of its rule."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from common.records import (
    ARRAYS,
    LABEL_NEG,
    LABEL_POS,
    MASKED_COUNTS,
    MASKED_VALIDATION,
    METRICS,
    NUM_EXAMPLES,
    PUBLIC_KEY,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SITE,
    SITE_ID,
    STEPS,
    TRAIN_LOSS,
    VALIDATION_KEYS,
    VALIDATION_MASK,
)
from common.secure_validation import vector_length
from server.validation import (
    MAX_COUNT,
    RADIOMICS_EVALUATE_TYPE,
    Problem,
    array_specs,
    bound_examples,
    check_reply,
    counts_schema,
    evaluate_schema,
    radiomics_score_schema,
    train_schema,
    validation_step_schema,
)

N_LABELS = 2
HALF = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32), "n": np.zeros((), np.int64)}
SPECS = array_specs(ArrayRecord({k: Array(v) for k, v in HALF.items()}))


def train_content(arrays=None, metrics=None, site="site-01") -> RecordDict:
    """An honest stage-2 train reply, with ``arrays`` / ``metrics`` entries replaced (None: removed)."""
    a = {k: v.copy() for k, v in HALF.items()}
    a.update(arrays or {})
    m = {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5, STEPS: 2, LABEL_POS: [1, 2], LABEL_NEG: [8, 7]}
    m.update(metrics or {})
    return RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(v) for k, v in a.items() if v is not None}),
            METRICS: MetricRecord({k: v for k, v in m.items() if v is not None}),
            SITE: ConfigRecord({SITE_ID: site}),
        }
    )


def train_problems(content: RecordDict, stage: int = 2, max_mb: float = 0.0) -> list[Problem]:
    return check_reply(content, MessageType.TRAIN, train_schema(SPECS, N_LABELS, stage, max_mb))


def test_an_honest_reply_of_each_phase_passes():
    assert train_problems(train_content()) == []
    evaluate = RecordDict(
        {
            METRICS: MetricRecord({NUM_EXAMPLES: 5, "dice": 0.7, "auc_study/a": float("nan"), "n_slices": 5}),
            SITE: ConfigRecord({SITE_ID: "site-01"}),
        }
    )
    assert check_reply(evaluate, MessageType.EVALUATE, evaluate_schema(["a", "b"], 0)) == []
    counts = RecordDict(
        {
            METRICS: MetricRecord({NUM_EXAMPLES: 9, LABEL_POS: [1, 0], LABEL_NEG: [8, 9]}),
            SITE: ConfigRecord({SITE_ID: "site-01"}),
        }
    )
    assert check_reply(counts, MessageType.QUERY, counts_schema("", N_LABELS, 0)) == []


@pytest.mark.parametrize(
    ("arrays", "metrics", "rule", "key"),
    [
        ({"b": None}, {}, "array-missing", "b"),
        ({"extra": np.zeros(1, np.float32)}, {}, "array-unexpected", "extra"),
        ({"w": np.zeros((2, 3), np.float32)}, {}, "array-shape", "w"),
        ({"w": np.zeros((3, 2), np.float64)}, {}, "array-dtype", "w"),
        ({"n": np.zeros((), np.int32)}, {}, "array-dtype", "n"),
        ({"b": np.array([0, np.inf, 0], np.float32)}, {}, "array-non-finite", "b"),
        ({}, {"secret": 1.0}, "metric-unexpected", "secret"),
        ({}, {NUM_EXAMPLES: None}, "metric-missing", NUM_EXAMPLES),
        ({}, {NUM_EXAMPLES: -1}, "count-not-non-negative-integer", NUM_EXAMPLES),
        ({}, {NUM_EXAMPLES: 2.5}, "count-not-non-negative-integer", NUM_EXAMPLES),
        ({}, {NUM_EXAMPLES: float(MAX_COUNT) * 10}, "count-too-large", NUM_EXAMPLES),
        ({}, {NUM_EXAMPLES: float("inf")}, "not-finite", NUM_EXAMPLES),
        ({}, {STEPS: float("nan")}, "not-finite", STEPS),
        ({}, {LABEL_POS: [1, 2, 3]}, "wrong-length", LABEL_POS),
        ({}, {LABEL_NEG: [8, -7]}, "count-not-non-negative-integer", LABEL_NEG),
        ({}, {LABEL_NEG: None}, "metric-missing", LABEL_NEG),
        ({}, {LABEL_POS: [11, 0]}, "counts-exceed-examples", LABEL_POS),
        ({}, {TRAIN_LOSS: float("nan")}, "not-finite", TRAIN_LOSS),
        ({}, {TRAIN_LOSS: -1.0}, "out-of-range", TRAIN_LOSS),
    ],
)
def test_each_train_rule_names_the_rule_and_the_key(arrays, metrics, rule, key):
    assert Problem(rule, key) in train_problems(train_content(arrays, metrics))


def test_stage1_counts_are_not_bounded_by_num_examples_and_an_idle_site_may_have_no_loss():
    """Stage 1's num-examples counts slices with a mask, the label counts the whole split."""
    assert train_problems(train_content(metrics={LABEL_POS: [11, 0]}), stage=1) == []
    assert train_problems(train_content(metrics={NUM_EXAMPLES: 0, TRAIN_LOSS: float("nan")})) == []


@pytest.mark.parametrize(
    ("content", "rule", "key"),
    [
        (RecordDict(), "record-missing", ARRAYS),
        (train_content(site="Doe^John 1970"), "site-id", SITE_ID),
        (train_content(site="x" * 65), "site-id", SITE_ID),
    ],
)
def test_records_and_site_id(content, rule, key):
    assert Problem(rule, key) in train_problems(content)


def test_unexpected_records_and_unprintable_keys_are_not_shown():
    content = train_content()
    content["notes"] = ConfigRecord({"x": 1})
    content[METRICS]["Doe^John, 1970-01-01"] = 1.0
    assert train_problems(content) == [Problem("record-unexpected", "notes")]
    del content["notes"]
    assert train_problems(content) == [Problem("metric-unexpected", "<unprintable key>")]


def test_message_type_and_size():
    content = train_content()
    schema = train_schema(SPECS, N_LABELS, 2, 0.0)
    assert check_reply(content, MessageType.EVALUATE, schema) == [Problem("message-type", MessageType.EVALUATE)]
    content[SITE][SITE_ID] = "s" * 60
    content[METRICS][LABEL_POS] = [0] * (1 << 17)  # 1 MiB of counts: over the half + 1 MiB bound
    assert train_problems(content) == [Problem("message-too-large", "reply")]
    assert Problem("message-too-large", "reply") in train_problems(train_content(), max_mb=1e-5)


def test_evaluate_scores_in_zero_one_and_studies_within_slices():
    schema = evaluate_schema(["a"], 0)

    def problems(**metrics) -> list[Problem]:
        content = RecordDict(
            {METRICS: MetricRecord({NUM_EXAMPLES: 5, **metrics}), SITE: ConfigRecord({SITE_ID: "site-01"})}
        )
        return check_reply(content, MessageType.EVALUATE, schema)

    assert problems(**{"auc_study/a": 1.5}) == [Problem("out-of-range", "auc_study/a")]
    assert problems(**{"auc_slice/a": float("-inf")}) == [Problem("not-finite", "auc_slice/a")]
    assert problems(**{"auc_slice/zz": 0.5}) == [Problem("metric-unexpected", "auc_slice/zz")]
    assert problems(**{"brier_study/a": 0.2, "ece_study/a": 0.1, "auprc_study/a": 0.9, "n_studies_fallback": 1}) == []
    assert problems(**{"ece_study/a": -0.1}) == [Problem("out-of-range", "ece_study/a")]
    assert problems(n_slices=3, n_studies=4) == [Problem("counts-exceed-examples", "n_studies")]


def test_evaluate_validation_sums_have_the_lengths_of_common_validation():
    """A deep evaluate reply carrying plain ``val/`` sums is rejected (they travel only masked). Where
    they are still plain (a radiomics "score" reply) the honest sums pass; wrong lengths, negative or
    fractional counts and non-finite NLLs are each rejected by rule and key."""
    from types import SimpleNamespace

    from common.validation import ValidationStats

    outputs = SimpleNamespace(labels=np.array([[1.0], [0.0], [1.0]]), logits=np.array([[2.0], [-1.0], [0.3]]))
    honest = ValidationStats.from_outputs(outputs, [(5, 1, 2)]).to_metrics()
    schema = radiomics_score_schema(["a"], 0)

    def problems(**changes) -> list[Problem]:
        metrics = {NUM_EXAMPLES: 5, **honest, **changes}
        content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({SITE_ID: "site-01"})})
        return check_reply(content, RADIOMICS_EVALUATE_TYPE, schema)

    plain = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5, **honest}), SITE: ConfigRecord({SITE_ID: "site-01"})})
    assert {p.rule for p in check_reply(plain, MessageType.EVALUATE, evaluate_schema(["a"], 0))} == {
        "metric-unexpected"
    }
    assert problems() == []
    hist = list(honest["val/pos_hist"])
    assert problems(**{"val/pos_hist": hist[:-1]}) == [Problem("wrong-length", "val/pos_hist")]
    assert problems(**{"val/neg_hist": [-1] + hist[1:]}) == [Problem("count-not-non-negative-integer", "val/neg_hist")]
    nll = list(honest["val/temperature_nll"])
    assert problems(**{"val/temperature_nll": [float("nan")] + nll[1:]}) == [
        Problem("not-finite", "val/temperature_nll")
    ]
    assert problems(**{"val/temperature_nll": [-1.0] + nll[1:]}) == [Problem("out-of-range", "val/temperature_nll")]
    assert problems(**{"val/dice_tp": 2.5}) == [Problem("count-not-non-negative-integer", "val/dice_tp")]


def test_secure_counts_steps():
    keys = RecordDict(
        {METRICS: MetricRecord(), SECURE: ConfigRecord({PUBLIC_KEY: b"k" * 31}), SITE: ConfigRecord({SITE_ID: "s1"})}
    )
    assert check_reply(keys, MessageType.QUERY, counts_schema(SECURE_KEYS, N_LABELS, 0)) == [
        Problem("public-key", PUBLIC_KEY)
    ]
    keys[SECURE][PUBLIC_KEY] = b"k" * 32
    assert check_reply(keys, MessageType.QUERY, counts_schema(SECURE_KEYS, N_LABELS, 0)) == []
    masked = RecordDict(
        {METRICS: MetricRecord({MASKED_COUNTS: [0, 1, 2, 3, 2**32]}), SITE: ConfigRecord({SITE_ID: "s1"})}
    )
    mask_schema = counts_schema(SECURE_MASK, N_LABELS, 0)
    assert check_reply(masked, MessageType.QUERY, mask_schema) == [Problem("out-of-range", MASKED_COUNTS)]
    masked[METRICS][MASKED_COUNTS] = [0, 1, 2, 3, 2**32 - 1]
    assert check_reply(masked, MessageType.QUERY, mask_schema) == []
    with pytest.raises(ValueError, match="no reply schema for secure counts step 'shuffle'"):
        counts_schema("shuffle", N_LABELS, 0)


def test_secure_validation_steps():
    """A chosen round's evaluate reply must carry one public key; the masked step one uint32 vector of
    ``vector_length`` words and nothing else; an unknown step has no schema."""
    site = ConfigRecord({SITE_ID: "s1"})
    evaluate = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5, "dice": 0.7}), SITE: site})
    assert check_reply(evaluate, MessageType.EVALUATE, evaluate_schema(["a"], 0, secure_keys=True)) == [
        Problem("record-missing", SECURE)
    ]
    evaluate[SECURE] = ConfigRecord({PUBLIC_KEY: b"k" * 32})
    assert check_reply(evaluate, MessageType.EVALUATE, evaluate_schema(["a"], 0, secure_keys=True)) == []
    keys = RecordDict({METRICS: MetricRecord(), SECURE: ConfigRecord({PUBLIC_KEY: b"k" * 32}), SITE: site})
    assert check_reply(keys, MessageType.EVALUATE, validation_step_schema(VALIDATION_KEYS, N_LABELS, 0)) == []
    schema = validation_step_schema(VALIDATION_MASK, N_LABELS, 0)
    words = np.zeros(vector_length(N_LABELS), np.uint32)

    def masked(array: np.ndarray, **metrics) -> list[Problem]:
        content = RecordDict(
            {ARRAYS: ArrayRecord({MASKED_VALIDATION: Array(array)}), METRICS: MetricRecord(metrics), SITE: site}
        )
        return check_reply(content, MessageType.EVALUATE, schema)

    assert masked(words) == []
    assert masked(words[:-1]) == [Problem("array-shape", MASKED_VALIDATION)]
    assert masked(words.astype(np.int64)) == [Problem("array-dtype", MASKED_VALIDATION)]
    assert masked(words, **{"val/pos_hist": [1, 2]}) == [Problem("metric-unexpected", "val/pos_hist")]
    with pytest.raises(ValueError, match="no reply schema for secure validation step"):
        validation_step_schema("shuffle", N_LABELS, 0)


# --- the num-examples bound ------------------------------------------------------------------


def test_bound_caps_at_factor_times_the_others_median_and_at_the_declared_count():
    claimed = {"a": 100.0, "b": 120.0, "c": 80.0, "d": 100_000.0}
    capped = bound_examples(claimed, {}, 10.0)
    assert capped == {"d": 10.0 * float(np.median([100.0, 120.0, 80.0]))}
    # a declared count caps too, whichever is lower
    assert bound_examples(claimed, {"d": 150.0, "a": 200.0}, 10.0) == {"d": 150.0}
    assert bound_examples(claimed, {"b": 60.0}, 10.0) == {"b": 60.0, "d": 1000.0}
    assert bound_examples(claimed, {"d": 150.0}, 0.0) == {}  # 0: no bound at all
    assert bound_examples({"a": 1e9}, {}, 10.0) == {}  # a lone site has no others to compare with


def test_bound_limits_an_inflated_sites_share_of_the_weight():
    honest = {f"s{i}": float(n) for i, n in enumerate((90, 100, 110))}
    claimed = {**honest, "x": 1000.0 * 100}
    weights = {**claimed, **bound_examples(claimed, {}, 10.0)}
    share = weights["x"] / sum(weights.values())
    assert claimed["x"] / sum(claimed.values()) > 0.99
    assert share == pytest.approx(1000.0 / (1000.0 + 300.0))
