"""A site's part of the radiomics federation (``radiomics.rounds`` > 0; ``server.radiomics``).

The features of the site's studies (``client.radiomics``) are computed once per run and kept on the
site's own disk (``SiteStore``): the training studies' on their reference masks at the stats query,
the validation and test studies' on the masks of the global U-Net the server sends once (named by
its digest afterwards, as the frozen U-Net of stage 2). What leaves the site is what
docs/design.md §5 allows: per-feature counts, sums and sums of squares and study label counts (stats),
the logistic weights after local gradient steps (train), and the validation sums and scalar test
metrics the deep model's evaluate reply carries (evaluate). Never a study's features or score.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from client.data.dataset import SliceDataset
from client.federation.errors import SiteError
from client.federation.exchange import frozen_unet, load_half
from client.federation.site_data import SiteData
from client.federation.site_run import SiteRunConfig
from client.federation.store import SiteStore
from client.radiomics import StudyFeatures, predicted_features, radiomics_metrics, reference_features, study_outputs
from common.model import build_joint_model
from common.radiomics import (
    N_FEATURES,
    candidate_stats,
    feature_sums,
    label_sums,
    logistic_step,
    predict_logits,
    standardised,
    weighted_bce,
)
from common.records import (
    ARRAYS,
    CANDIDATES_PREFIX,
    FEATURE_N,
    FEATURE_SUM,
    FEATURE_SUMSQ,
    LABEL_NEG,
    LABEL_POS,
    NUM_EXAMPLES,
    RADIOMICS_WEIGHTS,
    STEPS,
    TRAIN_LOSS,
    RadiomicsInstruction,
)
from common.validation import ValidationStats


def training_features(data: SiteData, store: SiteStore) -> StudyFeatures:
    """The training studies with a reference mask and an annotated marker, on their reference masks;
    computed at the first message of the run that needs them and read back after."""
    path = store.root / "radiomics-train.npz"
    features = StudyFeatures.load(path)
    if features is None:
        features = reference_features(data.train).annotated()
        features.save(path)
    return features


def held_out_features(
    msg: Message, order: RadiomicsInstruction, run: SiteRunConfig, data: SiteData, store: SiteStore, device: str
) -> tuple[StudyFeatures, StudyFeatures]:
    """(validation, test) features on the masks of the global U-Net ``order.unet_digest`` (sent with
    the site's first evaluate message), computed once per U-Net and kept on the site's disk."""
    if not order.unet_digest:
        raise SiteError("a radiomics evaluate message names no U-Net digest")
    paths = [store.root / f"radiomics-{split}-{order.unet_digest}.npz" for split in ("val", "test")]
    loaded = [StudyFeatures.load(p) for p in paths]
    if all(f is not None for f in loaded):
        return loaded[0], loaded[1]
    model = build_joint_model(run.model, seed=run.seed)
    load_half(model, "unet", frozen_unet(msg, order.unet_digest, store), store, set())
    splits = (data.val or SliceDataset(data.test.cache, np.zeros(0, np.int64)), data.test)
    out = [predicted_features(ds, model, torch.device(device), run.eval_batch_size) for ds in splits]
    for features, path in zip(out, paths):
        features.save(path)
    return out[0], out[1]


def stats_metrics(train: StudyFeatures) -> dict[str, int | list[int] | list[float]]:
    """The stats reply: per-feature counts, sums and sums of squares, study label counts per marker."""
    n, total, total_sq = feature_sums(train.features.reshape(-1, N_FEATURES))
    pos, neg = label_sums(train.labels)
    return {
        NUM_EXAMPLES: len(train),
        FEATURE_N: [int(v) for v in n],
        FEATURE_SUM: total.tolist(),
        FEATURE_SUMSQ: total_sq.tolist(),
        LABEL_POS: [int(v) for v in pos],
        LABEL_NEG: [int(v) for v in neg],
    }


def _standardised(features: StudyFeatures, order: RadiomicsInstruction) -> np.ndarray:
    if len(order.mean) != N_FEATURES or len(order.sd) != N_FEATURES:
        raise SiteError(f"the radiomics message's feature statistics are not of {N_FEATURES} features")
    return standardised(features.features.reshape(-1, N_FEATURES), np.asarray(order.mean), np.asarray(order.sd))


def received_weights(msg: Message, order: RadiomicsInstruction) -> np.ndarray:
    """The message's weights [K, M, F + 1], one set per L2 candidate of ``order``."""
    W = np.asarray(msg.content[ARRAYS][RADIOMICS_WEIGHTS].numpy(), dtype=np.float64)
    if W.ndim != 3 or W.shape[2] != N_FEATURES + 1:
        raise SiteError(f"radiomics weights of shape {W.shape}; this site has {N_FEATURES} features")
    return W


def local_update(
    train: StudyFeatures, order: RadiomicsInstruction, weights: np.ndarray
) -> tuple[ArrayRecord, dict[str, int | float]]:
    """``order.local_steps`` gradient steps from the global weights of every L2 candidate on the
    site's training studies; the trained weights and the reply's scalars (the mean loss after them)."""
    if len(order.l2) != len(weights):
        raise SiteError(f"{len(weights)} radiomics weight sets for {len(order.l2)} L2 strengths")
    X, y, pw = _standardised(train, order), train.labels, np.asarray(order.pos_weight)
    if not len(train):
        return ArrayRecord({RADIOMICS_WEIGHTS: Array(weights)}), {NUM_EXAMPLES: 0, TRAIN_LOSS: float("nan"), STEPS: 0}
    trained = np.stack(
        [logistic_step(w, X, y, pw, order.lr, l2, order.local_steps) for w, l2 in zip(weights, order.l2)]
    )
    loss = float(np.mean([weighted_bce(w, X, y, pw, l2) for w, l2 in zip(trained, order.l2)]))
    metrics = {NUM_EXAMPLES: len(train), TRAIN_LOSS: loss, STEPS: int(order.local_steps)}
    return ArrayRecord({RADIOMICS_WEIGHTS: Array(np.ascontiguousarray(trained))}), metrics


def select_metrics(val: StudyFeatures, order: RadiomicsInstruction, weights: np.ndarray) -> dict:
    """The "select" reply: every candidate's validation sums (K x M columns) and the validation studies."""
    stats = candidate_stats(weights, _standardised(val, order), val.labels)
    return {NUM_EXAMPLES: len(val), **stats.to_metrics(CANDIDATES_PREFIX)}


def score_metrics(val: StudyFeatures, test: StudyFeatures, order: RadiomicsInstruction, weights: np.ndarray) -> dict:
    """The "score" reply, as the deep model's evaluate reply: the scalar test metrics of the chosen
    weights ([1, M, F + 1]) and the validation sums (temperature NLL, logit bins, the U-Net's pixel counts)."""
    W = weights[0]
    scores = radiomics_metrics(test, predict_logits(W, _standardised(test, order)))
    metrics: dict = {
        k: (v if isinstance(v, int) else float(v))
        for k, v in scores.items()
        if k != "arrays" and isinstance(v, (int, float, np.floating, np.integer))
    }
    metrics[NUM_EXAMPLES] = int(test.n_slices)
    outputs = study_outputs(val, predict_logits(W, _standardised(val, order)))
    known = ~np.isnan(val.dice_counts).any(axis=1)
    metrics.update(ValidationStats.from_outputs(outputs, val.dice_counts[known].tolist()).to_metrics())
    return metrics
