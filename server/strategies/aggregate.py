"""How reply metrics combine: counts are summed, everything else is a weighted mean.

Flower's default (``aggregate_metricrecords``) averages every metric, lists included, which would
turn each site's label counts into a meaningless average (docs/design.md §8). Both functions here have
the signature Flower's strategies take as ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import MetricRecord, RecordDict

from common.records import SUMMED_METRICS


def _metric_record(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()))


def aggregate_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Sum ``SUMMED_METRICS`` (lists element-wise); average the rest weighted by
    ``weighting_metric_name``, skipping NaN (a site without positives has no AUC, and its
    NaN must not erase the other sites' values). A metric NaN at every site stays NaN."""
    metrics = [_metric_record(r) for r in records]
    weights = np.asarray([float(m[weighting_metric_name]) for m in metrics])
    out = MetricRecord()
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    for key in keys:
        values = [m[key] for m in metrics if key in m]
        if key in SUMMED_METRICS:
            out[key] = [sum(col) for col in zip(*values)] if isinstance(values[0], list) else sum(values)
            continue
        if isinstance(values[0], list):
            continue  # no list-valued metric is averaged
        v = np.asarray([float(m[key]) if key in m else math.nan for m in metrics])
        ok = ~np.isnan(v) & (weights > 0)
        out[key] = float(np.average(v[ok], weights=weights[ok])) if ok.any() else math.nan
    return out
