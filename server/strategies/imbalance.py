"""Class-imbalance-aware head: each label's output row is averaged by the sites' positives for it.

With rare markers, most sites have few or no positives for a label, and a plain average lets the
sites that never saw one pull that label's output row back toward "always negative". Here, after
the base strategy aggregates, row ``c`` of the final classifier layer (its weight row and bias) is
replaced by the average of the sites' rows weighted by each site's positive count for label ``c``
(``label-pos`` in the reply). A label no site has positives for keeps the base aggregate.

It is a mixin so that any Flower strategy gains the option: ``with_imbalance_head(FedAvg)``.
Server-side optimisers (FedAdam, FedYogi) then apply to every array but the head rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from common.records import LABEL_POS, NUM_EXAMPLES


class PositiveWeightedHead:
    """Mixin for a Flower strategy; ``head_keys`` = (weight key, bias key) of the final layer."""

    def __init__(self, *args, head_keys: tuple[str, str] = ("", ""), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.head_keys = tuple(k for k in head_keys if k)

    def _head_rows(self, replies: list[Message]) -> tuple[dict[str, list[np.ndarray]], np.ndarray] | None:
        ok = [m for m in replies if not m.has_error()]
        ok = [m for m in ok if float(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES]) > 0]
        if (
            not ok
            or not self.head_keys
            or any(k not in ok[0].content.array_records[self.arrayrecord_key] for k in self.head_keys)
        ):
            return None
        if any(LABEL_POS not in next(iter(m.content.metric_records.values())) for m in ok):
            # e.g. privacy.secure-counts: the sites keep their counts; the base aggregate stands
            log(WARNING, "imbalance-aware head: a reply has no %r; the head keeps the base aggregate", LABEL_POS)
            return None
        rows = {
            k: [m.content.array_records[self.arrayrecord_key][k].numpy().copy() for m in ok] for k in self.head_keys
        }
        positives = np.asarray([next(iter(m.content.metric_records.values()))[LABEL_POS] for m in ok], dtype=float)
        return rows, positives

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        head = self._head_rows(replies)  # read first: robust strategies pop arrays while aggregating
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or head is None:
            return arrays, metrics
        rows, positives = head
        out = ArrayRecord({k: v for k, v in arrays.items()})
        for key, site_rows in rows.items():
            out[key] = Array(positive_weighted_rows(np.stack(site_rows), positives, arrays[key].numpy()))
        return out, metrics


def positive_weighted_rows(site_rows: np.ndarray, positives: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``site_rows`` [S, C, ...], ``positives`` [S, C]: row c = sum_s pos[s,c] row[s,c] / sum_s pos[s,c];
    rows of labels without any positive keep ``base``."""
    out = np.array(base, dtype=site_rows.dtype, copy=True)
    total = positives.sum(axis=0)
    for c in np.flatnonzero(total > 0):
        out[c] = np.tensordot(positives[:, c] / total[c], site_rows[:, c], axes=1)
    return out


def with_imbalance_head(strategy_cls: type) -> type:
    """``strategy_cls`` with the positive-weighted head (a subclass; the base class is unchanged)."""
    return type(f"{strategy_cls.__name__}PositiveHead", (PositiveWeightedHead, strategy_cls), {})
