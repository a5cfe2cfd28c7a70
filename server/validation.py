"""Every site reply is checked here before the server uses any of it (docs/robustness.md).

A reply is data from a hospital the coordinator does not control: a site on another preset or an
older app version, a buggy one, or a hostile one. Before a reply reaches a strategy, the summed
label counts (the global ``pos-weight``) or the history, ``check_reply`` compares it with the
``ReplySchema`` of its phase: the records, the array keys, shapes and dtypes of the half being
trained, the metric keys of the phase and each value's range, the site id and the message size.
It returns the ``Problem`` s found (rule and key, never a value: a value may be anything a site
chose to put there). ``bound_examples`` caps the ``num-examples`` FedAvg weights by.

Pure functions: the caller (``server.replies.Messenger``) logs and records what they return.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from common.records import (
    ARRAYS,
    CANDIDATES_PREFIX,
    FEATURE_N,
    FEATURE_SUM,
    FEATURE_SUMSQ,
    GAN_ACTION,
    GAN_D_LOSS,
    GAN_G_LOSS,
    LABEL_NEG,
    LABEL_POS,
    MASKED_COUNTS,
    MASKED_VALIDATION,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    PRIVACY_EXHAUSTED,
    PUBLIC_KEY,
    RADIOMICS_ACTION,
    RADIOMICS_STATS_ACTION,
    SECURE,
    SECURE_KEYS,
    SECURE_MASK,
    SITE,
    SITE_ID,
    STEPS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    VALIDATION_KEYS,
    VALIDATION_MASK,
)
from common.secure_validation import vector_length
from common.validation import metric_lengths

MIB = 1 << 20
#: A count above this is absurd for one site (a billion slices is a million studies of 1000 slices).
MAX_COUNT = 10**9
#: A site id as sites write it (``site-01``, a folder name): short, no spaces, nothing else.
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: What a reply may hold beyond its arrays: metrics and ids, well under this.
METADATA_SLACK_BYTES = MIB
#: The X25519 public key of a secure counts "keys" reply.
PUBLIC_KEY_BYTES = 32


@dataclass(frozen=True)
class Problem:
    """One broken rule: its name (docs/robustness.md lists them) and the offending key."""

    rule: str
    key: str

    def __str__(self) -> str:
        return f"{self.rule} ({self.key})"


@dataclass(frozen=True)
class ArraySpec:
    """What one array of the half being trained must look like."""

    shape: tuple[int, ...]
    dtype: str


# --- one metric value ----------------------------------------------------------------------
# A checker returns the rule a value breaks, or None.


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> str | None:
    if not _is_number(v) or not math.isfinite(v):
        return "not-finite"
    if not float(v).is_integer() or v < 0:
        return "count-not-non-negative-integer"
    return "count-too-large" if v > MAX_COUNT else None


def _bounded(low: float, high: float, nan_ok: bool) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not _is_number(v):
            return "not-a-number"
        if math.isnan(v):
            return None if nan_ok else "not-finite"
        if not math.isfinite(v):
            return "not-finite"
        return None if low <= v <= high else "out-of-range"

    return check


def _count_list(n_labels: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != n_labels:
            return "wrong-length"
        return next((p for p in map(_count, v) if p), None)

    return check


def _nll_list(n: int) -> Callable[[Any], str | None]:
    """Summed negative log-likelihoods (``common.validation``): n finite floats >= 0."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != n:
            return "wrong-length"
        if not all(_is_number(x) and math.isfinite(x) for x in v):
            return "not-finite"
        return None if all(x >= 0 for x in v) else "out-of-range"

    return check


def _masked(n_labels: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != 2 * n_labels + 1:
            return "wrong-length"
        ok = all(_is_number(x) and float(x).is_integer() and 0 <= x < 2**32 for x in v)
        return None if ok else "out-of-range"

    return check


_score = _bounded(0.0, 1.0, nan_ok=True)  # AUC, Dice, ...: NaN when undefined (one class only)
_seconds = _bounded(0.0, 30 * 24 * 3600.0, nan_ok=False)
_loss = _bounded(0.0, 1e6, nan_ok=True)  # NaN: no step taken (num-examples 0, checked below)
_flag = _bounded(0, 1, nan_ok=False)


def train_metric_rules(n_labels: int) -> dict[str, Callable[[Any], str | None]]:
    """The metric keys a train reply may hold (``client.client_app.train``)."""
    return {
        NUM_EXAMPLES: _count,
        TRAIN_LOSS: _loss,
        STEPS: _count,
        TRAIN_SECONDS: _seconds,
        LABEL_POS: _count_list(n_labels),
        LABEL_NEG: _count_list(n_labels),
        PRIVACY_EPSILON: _bounded(0.0, 1e6, nan_ok=False),
        PRIVACY_DELTA: _bounded(0.0, 1.0, nan_ok=False),
        PRIVACY_EXHAUSTED: _flag,
    }


def gan_metric_rules() -> dict[str, Callable[[Any], str | None]]:
    """The metric keys a GAN round's reply may hold (``client.federation.site_gan.gan_round_metrics``):
    the crops trained on, steps, seconds, and the two hinge losses (G's may be negative)."""
    loss = _bounded(-1e6, 1e6, nan_ok=True)  # NaN: no step taken (num-examples 0, checked below)
    return {NUM_EXAMPLES: _count, STEPS: _count, TRAIN_SECONDS: _seconds, GAN_D_LOSS: loss, GAN_G_LOSS: loss}


def evaluate_metric_rules(
    output_names: Sequence[str], validation_sums: bool = True
) -> dict[str, Callable[[Any], str | None]]:
    """The metric keys an evaluate reply may hold (``client.training.evaluate.evaluate``); with
    ``validation_sums`` also the plain ``val/`` sums (a radiomics "score" reply; a deep evaluate reply
    never carries them: they travel masked, ``server.secure_validation``)."""
    rules: dict[str, Callable[[Any], str | None]] = {
        NUM_EXAMPLES: _count,
        "n_slices": _count,
        "n_studies": _count,
        "n_studies_fallback": _count,
        "volume_mae_ml": _bounded(0.0, 1e6, nan_ok=True),
    }
    for key in ("dice", "iou", "fscore", "dice_per_study", "macro_auc_study"):
        rules[key] = _score
    for name in output_names:  # AUROC, AUPRC, Brier score and ECE all lie in [0, 1]
        for metric in ("auc_slice", "auc_study", "auprc_study", "brier_study", "ece_study"):
            rules[f"{metric}/{name}"] = _score
    if not validation_sums:
        return rules
    for key, length in metric_lengths(len(output_names)).items():  # the validation sums
        rules[key] = _count if length == 0 else _nll_list(length) if key.endswith("nll") else _count_list(length)
    return rules


def counts_metric_rules(n_labels: int) -> dict[str, Callable[[Any], str | None]]:
    """The metric keys of a (plain) counts reply (``client.client_app.count_labels``)."""
    return {NUM_EXAMPLES: _count, LABEL_POS: _count_list(n_labels), LABEL_NEG: _count_list(n_labels)}


# --- a reply -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplySchema:
    """What a phase's reply must hold. ``required``: records and metric keys it must have;
    ``metrics``: every metric key it may have, with its checker; ``arrays``: the exact keys,
    shapes and dtypes of the half being trained (None: no ARRAYS record); ``max_bytes``: the size
    bound; ``counts_within_examples``: each label's positives + negatives <= num-examples."""

    message_type: str
    metrics: Mapping[str, Callable[[Any], str | None]]
    required_metrics: frozenset[str] = frozenset({NUM_EXAMPLES})
    arrays: Mapping[str, ArraySpec] | None = None
    max_bytes: int = METADATA_SLACK_BYTES
    counts_within_examples: bool = False
    secure_keys: bool = False  # a secure counts "keys" reply: a SECURE record with the public key
    records: frozenset[str] = field(default=frozenset())

    def expected_records(self) -> frozenset[str]:
        base = (
            {METRICS, SITE}
            | ({ARRAYS} if self.arrays is not None else set())
            | ({SECURE} if self.secure_keys else set())
        )
        return frozenset(base) | self.records


def array_specs(record: ArrayRecord, exclude: frozenset[str] | set[str] = frozenset()) -> dict[str, ArraySpec]:
    """The specs a reply's arrays must match: those of the half the server sent (less FedBN's local keys)."""
    return {k: ArraySpec(tuple(a.shape), str(a.dtype)) for k, a in record.items() if k not in exclude}


def default_max_bytes(arrays: Mapping[str, ArraySpec] | None, max_reply_mb: float) -> int:
    """``strategy.max-reply-mb`` in bytes; 0: the half's own size plus 1 MiB for metrics and ids."""
    if max_reply_mb > 0:
        return int(max_reply_mb * MIB)
    payload = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in (arrays or {}).values())
    return payload + METADATA_SLACK_BYTES


def train_schema(arrays: Mapping[str, ArraySpec], n_labels: int, stage: int, max_reply_mb: float) -> ReplySchema:
    """A train reply of ``stage``: in stage 2 num-examples counts the slices with an annotated label,
    so no label's positives + negatives exceed it (stage 1 counts slices with a mask: no such bound)."""
    return ReplySchema(
        MessageType.TRAIN,
        train_metric_rules(n_labels),
        frozenset({NUM_EXAMPLES, TRAIN_LOSS, STEPS}),
        arrays,
        default_max_bytes(arrays, max_reply_mb),
        counts_within_examples=stage == 2,
    )


#: The message type of a GAN round (``train.gan``: its own ClientApp handler).
GAN_MESSAGE_TYPE = f"{MessageType.TRAIN}.{GAN_ACTION}"


def gan_schema(arrays: Mapping[str, ArraySpec], max_reply_mb: float) -> ReplySchema:
    """A GAN round's reply: exactly the G and D arrays the server sent (``common.gan.gan_state_dict``)
    and ``gan_metric_rules``; nothing image-shaped can pass, since no key beyond the networks' is allowed."""
    rules = gan_metric_rules()
    return ReplySchema(GAN_MESSAGE_TYPE, rules, frozenset(rules), arrays, default_max_bytes(arrays, max_reply_mb))


def evaluate_schema(output_names: Sequence[str], max_reply_mb: float, secure_keys: bool = False) -> ReplySchema:
    """An evaluate reply: scalar test metrics only (no ``val/`` sums: a site sends those only masked);
    with ``secure_keys`` (a round that can be chosen) also the SECURE record with the site's public key
    for the secure validation sum (``server.secure_validation``)."""
    return ReplySchema(
        MessageType.EVALUATE,
        evaluate_metric_rules(output_names, validation_sums=False),
        max_bytes=default_max_bytes(None, max_reply_mb),
        secure_keys=secure_keys,
    )


def validation_step_schema(secure_phase: str, n_labels: int, max_reply_mb: float) -> ReplySchema:
    """A secure validation step's reply (``server.secure_validation``): a fresh public key
    (``VALIDATION_KEYS``), or the masked sums as one uint32 array of ``vector_length`` words
    (``VALIDATION_MASK``); no metric."""
    size = default_max_bytes(None, max_reply_mb)
    if secure_phase == VALIDATION_KEYS:
        return ReplySchema(MessageType.EVALUATE, {}, frozenset(), max_bytes=size, secure_keys=True)
    if secure_phase == VALIDATION_MASK:
        arrays = {MASKED_VALIDATION: ArraySpec((vector_length(n_labels),), "uint32")}
        return ReplySchema(MessageType.EVALUATE, {}, frozenset(), arrays, default_max_bytes(arrays, max_reply_mb))
    raise ValueError(f"no reply schema for secure validation step {secure_phase!r}")


def counts_schema(secure_phase: str, n_labels: int, max_reply_mb: float) -> ReplySchema:
    """The counts round's replies: plain counts (``secure_phase`` ""), or the secure counts step
    ``SECURE_KEYS`` / ``SECURE_MASK`` the query asked for (``server.secure_counts``)."""
    size = default_max_bytes(None, max_reply_mb)
    if secure_phase == SECURE_KEYS:
        return ReplySchema(MessageType.QUERY, {}, frozenset(), max_bytes=size, secure_keys=True)
    if secure_phase == SECURE_MASK:
        return ReplySchema(
            MessageType.QUERY, {MASKED_COUNTS: _masked(n_labels)}, frozenset({MASKED_COUNTS}), max_bytes=size
        )
    if secure_phase:
        raise ValueError(f"no reply schema for secure counts step {secure_phase!r}")
    rules = counts_metric_rules(n_labels)
    return ReplySchema(MessageType.QUERY, rules, frozenset(rules), max_bytes=size, counts_within_examples=True)


#: The radiomics federation's message types (``server.radiomics``): its own ClientApp handlers.
RADIOMICS_STATS_TYPE = f"{MessageType.QUERY}.{RADIOMICS_STATS_ACTION}"
RADIOMICS_TRAIN_TYPE = f"{MessageType.TRAIN}.{RADIOMICS_ACTION}"
RADIOMICS_EVALUATE_TYPE = f"{MessageType.EVALUATE}.{RADIOMICS_ACTION}"


def _float_list(n: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, list) or len(v) != n:
            return "wrong-length"
        return None if all(_is_number(x) and math.isfinite(x) for x in v) else "not-finite"

    return check


def radiomics_stats_schema(n_features: int, n_markers: int, max_reply_mb: float) -> ReplySchema:
    """A radiomics stats reply: per-feature counts, sums and sums of squares (>= 0) of the training
    studies, and their label counts per marker (within num-examples, the studies)."""
    rules = {
        NUM_EXAMPLES: _count,
        FEATURE_N: _count_list(n_features),
        FEATURE_SUM: _float_list(n_features),
        FEATURE_SUMSQ: _nll_list(n_features),
        LABEL_POS: _count_list(n_markers),
        LABEL_NEG: _count_list(n_markers),
    }
    size = default_max_bytes(None, max_reply_mb)
    return ReplySchema(RADIOMICS_STATS_TYPE, rules, frozenset(rules), max_bytes=size, counts_within_examples=True)


def radiomics_train_schema(arrays: Mapping[str, ArraySpec], max_reply_mb: float) -> ReplySchema:
    """A radiomics train reply: exactly the weights array sent, the studies trained on, the loss and steps."""
    rules = {NUM_EXAMPLES: _count, TRAIN_LOSS: _loss, STEPS: _count}
    return ReplySchema(RADIOMICS_TRAIN_TYPE, rules, frozenset(rules), arrays, default_max_bytes(arrays, max_reply_mb))


def radiomics_select_schema(n_columns: int, max_reply_mb: float) -> ReplySchema:
    """A radiomics "select" reply: the validation sums of every L2 candidate and marker (``n_columns``)."""
    rules: dict[str, Callable[[Any], str | None]] = {NUM_EXAMPLES: _count}
    for key, length in metric_lengths(n_columns, CANDIDATES_PREFIX).items():
        rules[key] = _count if length == 0 else _nll_list(length) if key.endswith("nll") else _count_list(length)
    return ReplySchema(
        RADIOMICS_EVALUATE_TYPE, rules, frozenset(rules), max_bytes=default_max_bytes(None, max_reply_mb)
    )


def radiomics_score_schema(output_names: Sequence[str], max_reply_mb: float) -> ReplySchema:
    """A radiomics "score" reply: a deep evaluate reply's test metrics plus the plain ``val/`` sums
    (``evaluate_metric_rules``; the radiomics federation does not mask them yet: docs/secure-aggregation.md §7)."""
    return ReplySchema(
        RADIOMICS_EVALUATE_TYPE,
        evaluate_metric_rules(output_names),
        max_bytes=default_max_bytes(None, max_reply_mb),
    )


def content_bytes(content: RecordDict) -> int:
    """A reply's size as it travels: array payloads, plus 8 bytes a number and the length of every
    string or bytes value (keys included)."""
    total = 0
    for name, record in content.items():
        total += len(name)
        if isinstance(record, ArrayRecord):
            total += sum(len(k) + len(a.data) for k, a in record.items())
            continue
        for key, value in record.items():
            total += len(key) + _value_bytes(value)
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8


def check_reply(content: RecordDict, message_type: str, schema: ReplySchema) -> list[Problem]:
    """Every rule the reply breaks, in the order docs/robustness.md lists them; [] for a good one.
    The size comes first: an oversized reply is not looked into further."""
    if message_type != schema.message_type:
        return [Problem("message-type", message_type if message_type in _MESSAGE_TYPES else "unknown")]
    if content_bytes(content) > schema.max_bytes:
        return [Problem("message-too-large", "reply")]
    names = set(content.keys())
    expected = schema.expected_records()
    problems = [Problem("record-missing", n) for n in sorted(expected - names)]
    problems += [Problem("record-unexpected", _safe_key(n)) for n in sorted(names - expected)]
    problems += [
        Problem("record-type", n) for n in sorted(expected & names) if not isinstance(content[n], _RECORD_TYPE[n])
    ]
    if problems:
        return problems
    problems += check_site(content[SITE])
    problems += check_metrics(content[METRICS], schema)
    if schema.arrays is not None:
        problems += check_arrays(content[ARRAYS], schema.arrays)
    if schema.secure_keys:
        key = content[SECURE].get(PUBLIC_KEY)
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES or len(content[SECURE]) != 1:
            problems.append(Problem("public-key", PUBLIC_KEY))
    return problems


_MESSAGE_TYPES = {
    MessageType.TRAIN,
    MessageType.EVALUATE,
    MessageType.QUERY,
    GAN_MESSAGE_TYPE,
    RADIOMICS_STATS_TYPE,
    RADIOMICS_TRAIN_TYPE,
    RADIOMICS_EVALUATE_TYPE,
}
_RECORD_TYPE = {ARRAYS: ArrayRecord, METRICS: MetricRecord, SITE: ConfigRecord, SECURE: ConfigRecord}


def _safe_key(key: str) -> str:
    """A key as logs may show it: a site picks its keys, so one that is not a plain name is not shown."""
    return key if re.fullmatch(r"[A-Za-z0-9._/\-]{1,80}", key) else "<unprintable key>"


def check_site(record: ConfigRecord) -> list[Problem]:
    """The SITE record holds the site id only, and a site id looks like one."""
    problems = [Problem("site-record-unexpected", _safe_key(k)) for k in sorted(set(record) - {SITE_ID})]
    sid = record.get(SITE_ID)
    if not isinstance(sid, str) or not SITE_ID_PATTERN.fullmatch(sid):
        problems.append(Problem("site-id", SITE_ID))
    return problems


def check_metrics(record: MetricRecord, schema: ReplySchema) -> list[Problem]:
    """Known keys only, the required ones present, each value in its range; counts consistent."""
    problems = [Problem("metric-unexpected", _safe_key(k)) for k in sorted(set(record) - set(schema.metrics))]
    problems += [Problem("metric-missing", k) for k in sorted(schema.required_metrics - set(record))]
    for key in sorted(set(record) & set(schema.metrics)):
        rule = schema.metrics[key](record[key])
        if rule:
            problems.append(Problem(rule, key))
    if problems:
        return problems
    if (LABEL_POS in record) != (LABEL_NEG in record):
        problems.append(Problem("metric-missing", LABEL_NEG if LABEL_POS in record else LABEL_POS))
    examples = record.get(NUM_EXAMPLES)
    if schema.counts_within_examples and LABEL_POS in record and LABEL_NEG in record and examples:
        if any(p + n > examples for p, n in zip(record[LABEL_POS], record[LABEL_NEG])):
            problems.append(Problem("counts-exceed-examples", LABEL_POS))
    # A site that trained reports a finite loss, except under DP-SGD, where the loss is not released
    # (client.training.privacy: it is data-dependent and not privatised) and is sent as NaN.
    if TRAIN_LOSS in record and examples and PRIVACY_EPSILON not in record and math.isnan(record[TRAIN_LOSS]):
        problems.append(Problem("not-finite", TRAIN_LOSS))
    problems += [
        Problem("not-finite", k) for k in (GAN_D_LOSS, GAN_G_LOSS) if examples and math.isnan(record.get(k, 0))
    ]
    if "n_studies" in record and "n_slices" in record and record["n_studies"] > record["n_slices"]:
        problems.append(Problem("counts-exceed-examples", "n_studies"))
    return problems


def check_arrays(record: ArrayRecord, expected: Mapping[str, ArraySpec]) -> list[Problem]:
    """The keys, shapes and dtypes of the half being trained, exactly; floating values finite."""
    keys = set(record.keys())
    problems = [Problem("array-missing", k) for k in sorted(set(expected) - keys)]
    problems += [Problem("array-unexpected", _safe_key(k)) for k in sorted(keys - set(expected))]
    for key in sorted(keys & set(expected)):
        problem = _array_problem(record[key], expected[key])
        if problem:
            problems.append(Problem(problem, key))
    return problems


def _array_problem(arr: Any, spec: ArraySpec) -> str | None:
    """The rule one array breaks: its declared and its decoded dtype and shape must both be the spec's."""
    if str(arr.dtype) != spec.dtype:
        return "array-dtype"
    if tuple(arr.shape) != spec.shape:
        return "array-shape"
    try:
        a = arr.numpy()
    except Exception:  # noqa: BLE001 - any payload numpy cannot read is the site's problem, not the server's
        return "array-undecodable"
    if str(a.dtype) != spec.dtype or a.shape != spec.shape:
        return "array-undecodable"  # the payload is not what the header says
    if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
        return "array-non-finite"
    return None


# --- weight inflation ----------------------------------------------------------------------


def bound_examples(claimed: Mapping[str, float], declared: Mapping[str, float], factor: float) -> dict[str, float]:
    """The ``num-examples`` each site is weighted by this round (the rule of docs/robustness.md):

    - with ``factor`` 0 the claims stand (no bound);
    - a site that declared its training slices in the counts round is weighted by at most that
      many (a train reply counts a subset of them);
    - no site is weighted by more than ``factor`` times the median of the *other* sites' claims
      this round, so fewer than half the sites cannot lift each other's bound.

    ``claimed``: site -> num-examples of this round's validated replies; ``declared``: site ->
    num-examples of its counts reply. Only the sites whose weight changes are returned.
    """
    if factor <= 0:
        return {}
    capped = {}
    for site, n in claimed.items():
        others = [v for s, v in claimed.items() if s != site]
        limits = [declared[site]] if site in declared else []
        if others:
            limits.append(factor * float(np.median(others)))
        if limits and n > min(limits):
            capped[site] = float(min(limits))
    return capped
