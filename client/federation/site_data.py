"""The site's data for a run: its cache split patient-wise, and what the server may learn of it
(label counts, usable examples) or the loss needs (stage 2's marker weights)."""

from __future__ import annotations

from dataclasses import dataclass
from logging import WARNING

import numpy as np
import torch
from flwr.common.logger import log

from client.data.cache import build_site_cache, open_cache
from client.data.dataset import SliceDataset, dataset_labels, hematoma_slices, split_slices
from client.data.expansion import ExpansionRule, disagreements, with_derived_expansion
from client.federation.node import SiteNode
from client.federation.site_run import SiteRunConfig
from client.training.privacy import usable_slices
from client.training.train import output_columns
from common.config import LABELS
from common.losses import label_counts, pos_weight_from_counts
from common.presets import ModelConfig
from common.records import TrainInstruction


@dataclass(frozen=True)
class SiteData:
    train: SliceDataset
    test: SliceDataset
    val: SliceDataset | None = None  # model selection, thresholds and temperature (common.validation)


def open_site(site: SiteNode, run: SiteRunConfig) -> SiteData:
    """The site's cache (built on first use, reused after; a simulation partition's is prebuilt)
    split patient-wise with the run's seed."""
    if site.cache_path is not None:
        cache, problems = open_cache(site.cache_path), []
    else:
        cache, problems = build_site_cache(site.data_path, site.cache_dir, run.preprocess)
    if problems:
        log(
            WARNING,
            "%s: %d data problem(s) while building the cache (see 'flwr-client check')",
            site.site_id,
            len(problems),
        )
    if run.model.predict_expansion:
        cache = _with_expansion(site, cache, run)
    idx = split_slices(cache, run.split, seed=run.seed, by="patient")
    return SiteData(
        SliceDataset(cache, idx["train"]), SliceDataset(cache, idx["test"]), SliceDataset(cache, idx["val"])
    )


def _with_expansion(site: SiteNode, cache, run: SiteRunConfig):
    """Empty expansion labels derived from the follow-ups; disagreements with labels.csv are logged
    as a count only (``client.data.expansion.format_disagreements`` names them by pseudonym)."""
    data = run.config.data
    cache, rows = with_derived_expansion(cache, ExpansionRule(data.expansion_ratio, data.expansion_ml or None))
    if bad := disagreements(rows):
        log(WARNING, "%s: %d expansion label(s) disagree with the mask volumes", site.site_id, len(bad))
    return cache


def stage2_pos_weight(mode: str, order: TrainInstruction, model, train_ds) -> torch.Tensor | None:
    """The marker weights of this round's loss: the server's global ones (paper formula 2 on the
    summed counts), this site's own (the baseline the global ones replace), or none."""
    if mode == "global":
        return torch.tensor(order.pos_weight) if order.pos_weight is not None else None
    if mode == "local":
        pos, neg = label_counts(dataset_labels(hematoma_slices(train_ds))[:, output_columns(model)])
        return pos_weight_from_counts(pos, neg)
    return None


def _output_columns(model_cfg: ModelConfig) -> list[int]:
    return [LABELS.index(name) for name in model_cfg.output_names]


def site_label_counts(ds: SliceDataset, model_cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Per-output (positives, negatives) of the slices stage 2 trains on (``hematoma_slices``), annotated
    labels only: what the global pos-weight (negatives / positives) is computed from."""
    cols = _output_columns(model_cfg)
    ds = hematoma_slices(ds)
    pos, neg = label_counts(ds.labels()[:, cols]) if len(ds) else (np.zeros(len(cols), int), np.zeros(len(cols), int))
    return [int(v) for v in pos], [int(v) for v in neg]


def usable_examples(ds: SliceDataset, stage: int, model_cfg: ModelConfig) -> int:
    """Training slices a stage can learn from (``client.training.privacy.usable_slices``, the one rule)."""
    return int(usable_slices(ds, stage, model_cfg).sum())
